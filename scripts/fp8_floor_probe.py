"""What do a grid's weights and its activations each cost on the embedded default? A perplexity table.

W8A8 perplexity splits into what the weights lose (round-to-nearest per channel, activations in full precision) and what
the per-token dynamic activations lose (weights in full precision), here for FP8 E4M3 (``method=fp8_dynamic``'s grids)
and int8 (``method=rtn_w8a8``'s), each with and without QuaRot's fixed rotations (R1, R2 random Hadamard, R4 online;
exact in full precision). The activations-only row is the floor of weight methods on that grid: GPTQ or AWQ can
compensate the weights' rounding, not each token's own activation rounding. Floats round to a relative step (E4M3: 3
mantissa bits), so neither a diagonal rescaling (SmoothQuant, AWQ) nor a rotation can lower their error the way they
lower an integer grid's.

    .venv/bin/python scripts/fp8_floor_probe.py                 # all 66 evaluation windows of 512 tokens
    .venv/bin/python scripts/fp8_floor_probe.py --windows 16
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ptq.affine import fake_quantize, minmax_qparams
from ptq.data import calibration_samples, evaluation_windows, load_tokens
from ptq.eval.perplexity import perplexity
from ptq.models.loading import embedded_smollm2, load_pretrained, load_tokenizer
from ptq.models.mappings import blocks_of, mapping_for
from ptq.nn import ActivationQuantizer
from ptq.spec import QuantSpec
from ptq.transforms.rotation import Rotation

GRIDS = {  # format: (weight spec per output channel, activation spec per token)
    "fp8_e4m3": (QuantSpec(bits=8, format="fp8_e4m3", granularity="channel"),
                 QuantSpec(bits=8, format="fp8_e4m3", granularity="token")),
    "int8": (QuantSpec(bits=8, symmetric=True, granularity="channel"),
             QuantSpec(bits=8, symmetric=True, granularity="token")),
}


def block_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    mapping = mapping_for(model)
    return [block.get_submodule(name) for block in blocks_of(model, mapping) for name in mapping.linear_names]


@contextmanager
def quantized(model: torch.nn.Module, weight: QuantSpec | None, activations: QuantSpec | None) -> Iterator[None]:
    """Every block linear's weight rounded to ``weight`` and its input to ``activations`` (None: full precision)
    while open; restored afterwards."""
    linears = block_linears(model)
    originals = [linear.weight.data for linear in linears]
    handles = []
    for linear in linears:
        if weight is not None:
            linear.weight.data = fake_quantize(linear.weight.data, *minmax_qparams(linear.weight.data, weight), weight)
        if activations is not None:
            quantizer = ActivationQuantizer(activations)
            handles.append(linear.register_forward_pre_hook(lambda module, args, q=quantizer: (q(args[0]), *args[1:])))
    try:
        yield
    finally:
        for linear, original in zip(linears, originals, strict=True):
            linear.weight.data = original
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--windows", type=int, default=None, help="evaluation windows (default: all)")
    args = parser.parse_args()

    source = embedded_smollm2()
    tokens = load_tokens("pydoc", load_tokenizer(source))
    windows = evaluation_windows(tokens.evaluation, 512, args.windows)
    print(f"{len(windows)} evaluation windows of 512 tokens\n")
    print("| rotation | grid | weights | activations | perplexity | vs full precision |\n|---|---|---|---|---:|---:|")
    for rotated in (False, True):
        model = load_pretrained(source, "float32").eval()
        if rotated:
            samples = calibration_samples(tokens.calibration, 1, 512, 0)
            Rotation(r3=False).prepare(model, mapping_for(model), samples, 1, "cpu")
        label = "R1 R2 R4" if rotated else "none"
        full = perplexity(model, windows, progress=False)
        print(f"| {label} | – | full | full | {full:.4f} | |", flush=True)
        for grid in args.grids:
            weight, activations = GRIDS[grid]
            for w, a in ((weight, None), (None, activations), (weight, activations)):
                with quantized(model, w, a):
                    ppl = perplexity(model, windows, progress=False)
                print(f"| {label} | {grid} | {'RTN' if w else 'full'} | {'per token' if a else 'full'} | {ppl:.4f} | "
                      f"{100 * (ppl / full - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
