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
from ptq.config import ConfigError, validate
from ptq.data import calibration_samples, evaluation_windows, load_tokens
from ptq.eval.perplexity import perplexity
from ptq.models import load_pretrained, load_tokenizer, mapping_for, random_llama, resolve_source
from ptq.nn import FakeQuantLinear
from ptq.report import summary_table
from ptq.tracking import Tracker, completed_results, git_commit, versions, write_results


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


def model_size(model: torch.nn.Module) -> dict[str, float]:
    """Sizes in MB at fp16 and as quantized (quantized Linears at their bits per weight, scales included), and the
    average bits per weight of the whole model and of its quantized Linears. Tied parameters count once."""
    bits_of = {id(m.weight): m.weight_spec.bits_per_weight(m.in_features)
               for m in model.modules() if isinstance(m, FakeQuantLinear)}
    params = {id(p): p for p in model.parameters()}
    numel = sum(p.numel() for p in params.values())
    quantized_bits = sum(p.numel() * bits_of.get(key, 16) for key, p in params.items())
    linear_numel = sum(params[key].numel() for key in bits_of)
    linear_bits = sum(params[key].numel() * bits for key, bits in bits_of.items())
    return {
        "fp16_mb": numel * 2 / 2**20,
        "quantized_mb": quantized_bits / 8 / 2**20,
        "bits_per_weight": quantized_bits / numel,
        "linear_bits_per_weight": linear_bits / linear_numel if linear_numel else 16.0,
    }


def baseline_key(cfg: DictConfig, windows: torch.Tensor) -> str:
    """Identifies a baseline: the model, the exact evaluation windows and the task settings."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    tasks = {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.limit, "num_fewshot": cfg.eval.num_fewshot}
    blob = json.dumps({"model": model, "data": cfg.data.name, "path": cfg.data.path, "windows": digest, **tasks},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_baseline(cfg: DictConfig, windows: torch.Tensor, compute: Any) -> tuple[dict[str, float], bool]:
    """Full-precision metrics for these exact windows and tasks, computed once per (model, data, eval settings)."""
    path = Path(cfg.eval.cache_dir).expanduser() / f"{baseline_key(cfg, windows)}.json"
    if path.is_file():
        return json.loads(path.read_text())["metrics"], True
    metrics = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": metrics, "model": cfg.model.name, "data": cfg.data.name}))
    return metrics, False


def check_tasks(tasks: list[str]) -> None:
    """Resolve lm-eval task names before any model loads (unknown or unreachable tasks fail in one line)."""
    if not tasks:
        return
    from ptq.eval.harness import TaskUnavailableError, load_tasks

    try:
        load_tasks(tasks)
    except (ValueError, TaskUnavailableError) as error:
        raise ConfigError(str(error)) from None


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run one configured experiment; write ``results.json`` into ``output_dir`` and return the results."""
    steps = validate(cfg)
    check_tasks(list(cfg.eval.tasks))
    done = completed_results(output_dir)
    if done is not None and done.get("config") == OmegaConf.to_container(cfg, resolve=True):
        print(f"skipping: {output_dir / 'results.json'} is complete for this config")
        print(summary_table(done))
        return done
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

    def evaluate() -> dict[str, float]:
        model.to(device)
        metrics = {"perplexity": perplexity(model, windows, cfg.eval.batch_size, device, cfg.progress)}
        if cfg.eval.tasks:
            from ptq.eval.harness import evaluate_tasks

            accuracy = evaluate_tasks(model, tokenizer, list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.batch_size,
                                      cfg.eval.num_fewshot, device, cfg.seed)
            metrics.update({f"{task}/{name}": value for task, values in accuracy.items()
                            for name, value in values.items()})
        model.to("cpu")
        return metrics

    baseline, from_cache = {}, False
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
    size = model_size(model)

    with timer.stage("eval_quantized"):
        quantized = evaluate()

    results = {
        "config": container,
        "method": cfg.method.name,
        "metrics": {"baseline": baseline, "quantized": quantized},
        "baseline_from_cache": from_cache,
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": int(windows.numel()),
        "size": size,
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
