"""llm-compressor's side of ``scripts/compare_llmcompressor.py``; runs in llm-compressor's own venv, never imports ptq.

    <peer-python> scripts/_llmcompressor_peer.py --model-dir DIR --data data.pt --steps steps.json --out result.json

``data.pt`` holds ``samples`` [n, seq_len] (calibration token windows) and ``windows`` [m, seq_len] (evaluation
windows), both built by ptq; ``steps.json`` is ptq's method (its list of steps, resolved) that this script
translates into llm-compressor modifiers: gptq → GPTQModifier, rtn → QuantizationModifier, smoothquant →
SmoothQuantModifier, awq → AWQModifier (followed by the quantizer step's modifier). The ``oneshot`` call alone is
timed; perplexity is measured on the saved windows with the same formula as ``ptq.eval.perplexity``.
Results go to ``--out`` as JSON (stdout and stderr carry llm-compressor's logs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EXIT_LOAD_FAILED = 3


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, device: str = "cpu") -> float:
    """exp(mean NLL) over non-overlapping windows [n, seq_len], each window scored alone (as ptq.eval.perplexity)."""
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def quantization_args(spec: dict[str, Any], activations: bool = False) -> dict[str, Any]:
    """A ptq QuantSpec dict as compressed-tensors QuantizationArgs fields."""
    args: dict[str, Any] = {"num_bits": int(spec["bits"]), "type": "int", "symmetric": bool(spec["symmetric"]),
                            "strategy": spec["granularity"]}
    if spec["granularity"] == "group":
        args["group_size"] = int(spec["group_size"])
    if activations:
        # ptq: no observer = dynamic per-token ranges; an observer = static ranges from calibration.
        args["dynamic"] = spec["granularity"] == "token" and not spec.get("observer")
    return args


def scheme(step: dict[str, Any]) -> dict[str, Any]:
    group: dict[str, Any] = {"targets": ["Linear"], "weights": quantization_args(step["weight"])}
    if step.get("activations"):
        group["input_activations"] = quantization_args(step["activations"], activations=True)
    return {"config_groups": {"group_0": group}, "ignore": ["lm_head"]}


def quantizer_modifier(step: dict[str, Any]) -> Any:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if step["name"] == "gptq":
        if step.get("true_sequential"):
            print("note: llm-compressor has no true_sequential switch; ignored", flush=True)
        # act_order: "weight" keeps groups in column order (ptq's static_groups), "group" forms them in
        # processing order. Without act_order llm-compressor takes every group's range from the original weight.
        actorder = ("weight" if step.get("static_groups") else "group") if step.get("act_order") else None
        return GPTQModifier(**scheme(step), block_size=int(step.get("block_size", 128)),
                            dampening_frac=float(step.get("damp_percent", 0.01)), actorder=actorder)
    if step["name"] == "rtn":
        return QuantizationModifier(**scheme(step))
    raise ValueError(f"step {step['name']!r}: no llm-compressor quantizer for it (known: gptq, rtn)")


def rescaler_modifier(step: dict[str, Any]) -> Any:
    if step["name"] == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return SmoothQuantModifier(smoothing_strength=float(step.get("alpha", step.get("smoothing_strength", 0.8))))
    if step["name"] == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return AWQModifier(n_grid=int(step.get("grid", step.get("n_grid", 20))))
    raise ValueError(f"step {step['name']!r}: no llm-compressor modifier for it (known: smoothquant, awq, gptq, rtn)")


def recipe(steps: list[dict[str, Any]]) -> list[Any]:
    """ptq's step list → llm-compressor modifiers, in the same order (rescalers first, then one quantizer)."""
    return [quantizer_modifier(s) if s["name"] in ("gptq", "rtn") else rescaler_modifier(s) for s in steps]


def allow_cpu_only_awq() -> None:
    """llm-compressor's AWQ pins its activation cache for fast host-to-GPU copies; without CUDA pinning fails."""
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="Hugging Face model directory (config.json, safetensors)")
    parser.add_argument("--data", required=True, help=".pt file with 'samples' and 'windows'")
    parser.add_argument("--steps", required=True, help="JSON file: ptq's resolved method steps")
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--calib-batch-size", type=int, default=1)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--check-windows", type=int, default=2, help="fp perplexity on this many windows (load check)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pipeline", default=None, help="llm-compressor calibration pipeline (default: its own)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=True)
    samples, windows = data["samples"], data["windows"]
    steps = json.loads(Path(args.steps).read_text())
    modifiers = recipe(steps)
    if any(s["name"] == "awq" for s in steps):
        allow_cpu_only_awq()

    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    except Exception as error:  # noqa: BLE001 - reported to the caller by exit status
        print(f"error: could not load {args.model_dir}: {error}", flush=True)
        raise SystemExit(EXIT_LOAD_FAILED) from error
    fp_check = perplexity(model, windows[: args.check_windows], args.eval_batch_size)

    n, seq_len = samples.shape
    dataset = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    options: dict[str, Any] = {}
    if args.pipeline:
        options["pipeline"] = args.pipeline
    start = time.perf_counter()
    model = oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=modifiers, num_calibration_samples=n,
                    max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=args.calib_batch_size,
                    **options)
    seconds = time.perf_counter() - start
    model.eval()

    result = {
        "perplexity": perplexity(model, windows, args.eval_batch_size),
        "calibrate_s": seconds,
        "fp_check_perplexity": fp_check,
        "check_windows": min(args.check_windows, len(windows)),
        "recipe": [repr(m) for m in modifiers],
        "threads": torch.get_num_threads(),
        "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
