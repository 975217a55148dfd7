"""Does SpinQuant's Cayley SGD lower the quantized loss on windows it was not trained on? A table per learning rate.

The rotations start at the rotation step's random Hadamard and are trained (``ptq.transforms.spinquant``) on the
first ``--train-windows`` of the embedded default's 64 calibration windows; the W16A4KV4 loss (the learning's own
quantizers) is then measured on ``--held-out`` windows from window 48 on, against the fixed rotations' loss.

    .venv/bin/python scripts/spinquant_step_probe.py --lr 1.5 0.2 0.05 --iterations 12 --train-windows 8
    .venv/bin/python scripts/spinquant_step_probe.py --lr 1.5 0.1 0.02 --iterations 12 --momentum 0.9
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ptq.data import calibration_samples, load_tokens
from ptq.models.loading import embedded_smollm2, load_pretrained, load_tokenizer
from ptq.models.mappings import mapping_for
from ptq.transforms.rotation import Rotation
from ptq.transforms.spinquant import CayleyOptions


def quantized_loss(model: torch.nn.Module, windows: torch.Tensor, options: CayleyOptions) -> float:
    """Mean next-token loss of ``windows`` with the learning's activation and KV quantizers in place."""
    with torch.no_grad(), options.quantized(model, mapping_for(model)):
        losses = [model(input_ids=w[None], labels=w[None], use_cache=False).loss.item() for w in windows]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1.5, 0.1, 0.02])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--train-windows", type=int, default=1)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--momentum", type=float, default=0.0, help="0: SpinQuant's, the default")
    args = parser.parse_args()

    source = embedded_smollm2()
    base = load_pretrained(source, "float32")
    samples = calibration_samples(load_tokens("pydoc", load_tokenizer(source)).calibration, 64, 512, 0)
    held_out = samples[48:48 + args.held_out, :args.seq_len]
    measure = CayleyOptions(progress=False)

    def rotated(learn: dict | None) -> tuple[float, float]:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        Rotation(learn=learn).prepare(model, mapping_for(model), samples, 8, "cpu")
        return quantized_loss(model, held_out, measure), time.perf_counter() - start

    fixed, _ = rotated(None)
    print(f"| lr | held-out W16A4KV4 loss | vs fixed rotations ({fixed:.4f}) | seconds |\n|---|---:|---:|---:|")
    for lr in args.lr:
        learn = {"iterations": args.iterations, "samples": args.train_windows, "seq_len": args.seq_len, "lr": lr,
                 "momentum": args.momentum, "progress": False}
        loss, seconds = rotated(learn)
        print(f"| {lr} | {loss:.4f} | {100 * (loss / fixed - 1):+.1f}% | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
