"""A run, end to end: load → baseline → calibrate → convert → evaluate → log. Nothing else sees the whole config."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ptq.calibrate import calibrate
from ptq.config import validate
from ptq.data import calibration_samples, evaluation_windows, load_tokens
from ptq.eval.perplexity import perplexity
from ptq.models import load_pretrained, load_tokenizer, mapping_for, random_llama, resolve_source
from ptq.nn import FakeQuantLinear
from ptq.report import summary_table
from ptq.tracking import Tracker, git_commit, versions, write_results


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is available; allowed here are auto, cpu")
    return name


def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """Tokenizer and model; ``model.random_init`` builds a random Llama with the embedded tokenizer."""
    if cfg.model.random_init is not None:
        tokenizer = load_tokenizer(resolve_source("smollm2-135m"))
        options = OmegaConf.to_container(cfg.model.random_init, resolve=True)
        return random_llama(tokenizer, cfg.model.dtype, cfg.seed, **options), tokenizer
    source = resolve_source(cfg.model.source, cfg.model.gguf_file)
    return load_pretrained(source, cfg.model.dtype), load_tokenizer(source)


def model_bytes(model: torch.nn.Module) -> tuple[float, float]:
    """(fp16 bytes, quantized bytes): every parameter at 16 bits, vs quantized Linears at their bits per weight.

    Tied parameters (embeddings shared with the LM head) are counted once.
    """
    fp16, quantized, seen = 0.0, 0.0, set()
    bits_of = {id(m.weight): m.weight_spec.bits_per_weight(m.in_features)
               for m in model.modules() if isinstance(m, FakeQuantLinear)}
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        fp16 += param.numel() * 2
        quantized += param.numel() * bits_of.get(id(param), 16) / 8
    return fp16, quantized


def baseline_key(cfg: DictConfig, windows: torch.Tensor) -> str:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    blob = json.dumps({"model": model, "data": cfg.data.name, "path": cfg.data.path, "windows": digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_baseline(cfg: DictConfig, windows: torch.Tensor, compute: Any) -> tuple[float, bool]:
    """The full-precision perplexity for these exact windows, computed once per (model, data, eval settings)."""
    path = Path(cfg.eval.cache_dir).expanduser() / f"{baseline_key(cfg, windows)}.json"
    if path.is_file():
        return json.loads(path.read_text())["perplexity"], True
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"perplexity": value, "model": cfg.model.name, "data": cfg.data.name}))
    return value, False


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run one configured experiment; write ``results.json`` into ``output_dir`` and return the results."""
    steps = validate(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    timer = Timer()
    container = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(container["logger"], container, output_dir, run_name(cfg))

    with timer.stage("load"):
        model, tokenizer = load_model(cfg)
        tokens = load_tokens(cfg.data.name, tokenizer, cfg.data.path)
        samples = calibration_samples(tokens.calibration, cfg.data.n_samples, cfg.data.seq_len, cfg.seed)
        windows = evaluation_windows(tokens.evaluation, cfg.eval.seq_len, cfg.eval.max_windows)
    fp16_bytes, _ = model_bytes(model)

    def evaluate() -> float:
        model.to(device)
        value = perplexity(model, windows, cfg.eval.batch_size, device, cfg.progress)
        model.to("cpu")
        return value

    baseline, from_cache = None, False
    if cfg.eval.baseline:
        with timer.stage("eval_baseline"):
            baseline, from_cache = cached_baseline(cfg, windows, evaluate)

    with timer.stage("calibrate"):
        layers = calibrate(model, mapping_for(model), samples, steps, device, cfg.data.batch_size,
                           cfg.method.propagate, cfg.progress)
    if cfg.backend != "fake":
        from ptq.packed import convert

        with timer.stage("convert"):
            model = convert(model, cfg.backend)
    _, quantized_bytes = model_bytes(model)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    with timer.stage("eval_quantized"):
        quantized = evaluate()

    results = {
        "config": container,
        "method": cfg.method.name,
        "metrics": {
            "baseline": {"perplexity": baseline},
            "quantized": {"perplexity": quantized},
        },
        "baseline_from_cache": from_cache,
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": int(windows.numel()),
        "size": {"fp16_mb": fp16_bytes / 2**20, "quantized_mb": quantized_bytes / 2**20,
                 "bits_per_weight": 8 * quantized_bytes / n_params},
        "timings_s": timer.seconds,
        "layers": layers,
        "versions": versions(),
        "git_commit": git_commit(),
        "wandb_dir": tracker.directory,
        "complete": True,
    }
    path = write_results(output_dir, results)
    tracker.log_layers(layers)
    tracker.finish(flat_summary(results), path)
    print(summary_table(results))
    return results


def run_name(cfg: DictConfig) -> str:
    group = f"g{cfg.group_size}" if cfg.group_size else "channel"
    return f"{cfg.model.name}-{cfg.method.name}-w{cfg.bits}{group}"


def flat_summary(results: dict[str, Any]) -> dict[str, Any]:
    summary = {f"{stage}/{metric}": value for stage, metrics in results["metrics"].items()
               for metric, value in metrics.items()}
    summary.update({f"size/{k}": v for k, v in results["size"].items()})
    summary.update({f"time/{k}": v for k, v in results["timings_s"].items()})
    return summary
