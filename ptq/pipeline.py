"""A run, end to end: load → baseline → calibrate → convert → evaluate → log. Nothing else sees the whole config."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ptq import distributed
from ptq.calibrate import EAGER, BlockSource, calibrate
from ptq.config import ConfigError, validate
from ptq.data import calibration_samples, evaluation_windows, load_tokens
from ptq.diagnostics import Diagnostics, plot_learning_curve
from ptq.eval.perplexity import blockwise_perplexity, perplexity
from ptq.export import EXPORT_NONE, EXPORTERS, ExportContext, Exporter, ExportError, ExportPlan, files_size
from ptq.models import (
    Mapping,
    ResolvedSource,
    digits,
    load_pretrained,
    load_tokenizer,
    mapping_for,
    random_llama,
    resolve_source,
)
from ptq.models.lazy import LazyLoadError, load_lazy, model_parts, wants_lazy
from ptq.models.loading import DTYPES, checkpoint_dtype, embedded_smollm2, load_config, random_llama_config
from ptq.models.mappings import blocks_of
from ptq.nn import FakeQuantLinear
from ptq.report import summary_table
from ptq.tracking import Tracker, completed_results, git_commit, versions, write_results
from ptq.transforms.llm_int8 import LLMInt8Linear

# Part of every cached baseline's key: bumped when a workload's metrics change, so no stale baseline is reused.
BASELINE_METRICS_VERSION = 2  # 2: the classifier also reports its test cross-entropy (nll)


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


def embedded_gguf() -> Path:
    """The embedded model's GGUF file (whose tokenizer random models use)."""
    source = embedded_smollm2()
    return Path(source.location) / source.gguf_file


def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """Tokenizer and model; ``model.random_init`` builds a random Llama with the embedded tokenizer."""
    if cfg.model.random_init is not None:
        tokenizer = load_tokenizer(resolve_source("smollm2-135m"))
        options = OmegaConf.to_container(cfg.model.random_init, resolve=True)
        return random_llama(tokenizer, cfg.model.dtype, cfg.seed, **options), tokenizer
    source = resolve_source(cfg.model.source, cfg.model.gguf_file)
    return load_pretrained(source, cfg.model.dtype), load_tokenizer(source)


@dataclass
class Workload:
    """What the pipeline needs of a kind of model (``model.kind``): the model and its mapping (None when nothing is
    calibrated), the calibration inputs (batched along dim 0), the evaluation inputs (they key the cached baseline),
    the metrics, what an export writes besides the model, and where the blocks' weights come from (``EAGER``: the
    model is in memory; a lazily loaded model's ``ptq.models.lazy.ShardedBlocks``)."""

    model: torch.nn.Module
    mapping: Mapping | None
    samples: torch.Tensor
    eval_data: torch.Tensor
    eval_tokens: int
    evaluate: Callable[[], dict[str, float]]
    export_context: ExportContext = field(default_factory=ExportContext)
    blocks: BlockSource = EAGER


def language_model(cfg: DictConfig, device: str) -> Workload:
    """A causal LM: calibrated on token windows of ``data``, scored by perplexity and the ``eval.tasks``; with
    ``model.lazy``, loaded one block at a time and scored by perplexity block by block."""
    if lazy_model(cfg):
        return lazy_language_model(cfg, device)
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
                                      cfg.eval.num_fewshot, device, cfg.seed, task_data=task_data(cfg))
            metrics.update({f"{task}/{name}": value for task, values in accuracy.items()
                            for name, value in values.items()})
        model.to("cpu")
        return metrics

    context = ExportContext(tokenizer, source_gguf(cfg), describe_run(cfg), export_options(cfg))
    mapping = mapping_for(model) if cfg.method.steps else None  # a loaded quantized checkpoint is not remapped
    return Workload(model, mapping, samples, windows, int(windows.numel()), evaluate, context)


def lazy_language_model(cfg: DictConfig, device: str) -> Workload:
    """``language_model`` for a checkpoint loaded lazily (``ptq.models.lazy``): the blocks stay on the meta device
    until calibration, evaluation or the export reaches them."""
    source = pretrained_source(cfg)
    model, blocks = load_lazy(source, cfg.model.dtype)
    mapping = mapping_for(model)
    tokens = load_tokens(cfg.data.name, load_tokenizer(source), cfg.data.path)
    samples = calibration_samples(tokens.calibration, cfg.data.n_samples, cfg.data.seq_len, cfg.seed)
    windows = evaluation_windows(tokens.evaluation, cfg.eval.seq_len, cfg.eval.max_windows)

    def evaluate() -> dict[str, float]:
        return {"perplexity": blockwise_perplexity(model, mapping, blocks, windows, cfg.eval.batch_size, device,
                                                   cfg.progress)}

    context = ExportContext(load_tokenizer(source), None, describe_run(cfg), export_options(cfg),
                            parts=lambda: model_parts(model, mapping, blocks))
    return Workload(model, mapping, samples, windows, int(windows.numel()), evaluate, context, blocks)


def lazy_model(cfg: DictConfig) -> bool:
    """Whether ``model.lazy`` (true / false / auto, with ``model.lazy_threshold_gb``) loads this run's model one
    block at a time; a one-line ``ConfigError`` where it was asked for and cannot."""
    if cfg.model.kind != "causal_lm":
        return False
    try:
        return wants_lazy(cfg.model.lazy, pretrained_source(cfg), cfg.model.lazy_threshold_gb)
    except LazyLoadError as error:
        raise ConfigError(str(error)) from None


def check_lazy(cfg: DictConfig, steps: list[Any], exporter: Exporter | None) -> None:
    """Refuse, before the model loads, what needs the whole model in memory when it is loaded lazily."""
    if not lazy_model(cfg):
        return
    whole = [step.name for step in steps if hasattr(step, "prepare")]
    conflicts = [
        (bool(cfg.eval.tasks), f"eval.tasks={list(cfg.eval.tasks)!r} (lm-eval tasks)", "eval.tasks=[]"),
        (cfg.backend != "fake", f"backend={cfg.backend} (packs the whole model)", "backend=fake"),
        (bool(whole), f"method={cfg.method.name} (its steps {whole} see the whole model first)", "another method"),
        (exporter is not None and not exporter.sharded,
         f"export={cfg.export.name} (written from the whole model)", "export=ptq or export=none"),
    ]
    for conflict, what, instead in conflicts:
        if conflict:
            raise ConfigError(f"{what}: needs the whole model in memory, which model.lazy=true loads one block at a "
                              f"time; allowed are {instead}, or model.lazy=false")


def classifier(cfg: DictConfig, device: str) -> Workload:
    """The digits MLP (``ptq.models.digits``): trained at load time with ``seed``, calibrated on every training
    image, scored by test accuracy and cross-entropy. Of ``data`` only ``batch_size`` applies."""
    if cfg.eval.tasks:
        raise ConfigError(f"eval.tasks={list(cfg.eval.tasks)!r}: model.kind=classifier is scored by accuracy; "
                          "allowed is []")
    split = digits.load_digits_split(cfg.seed)
    model = digits.train_mlp(split, cfg.seed)

    def evaluate() -> dict[str, float]:
        model.to(device)
        metrics = digits.classification_metrics(model, split.test_x, split.test_y, device=device)
        model.to("cpu")
        return metrics

    return Workload(model, digits.MAPPING, split.train_x, split.test_x, len(split.test_x), evaluate,
                    ExportContext(description=describe_run(cfg)))


def describe_run(cfg: DictConfig) -> str:
    """One line for an export's metadata: ptq, the method and its top-level scheme."""
    return f"ptq {cfg.method.name} ({run_name(cfg)})"


WORKLOADS: dict[str, Callable[[DictConfig, str], Workload]] = {"causal_lm": language_model, "classifier": classifier}


def model_size(model: torch.nn.Module) -> dict[str, float]:
    """Sizes in MB at fp16 and as quantized (quantized Linears at their bits per weight, scales included), and the
    average bits per weight of the whole model and of its quantized Linears. Tied parameters count once."""
    bits_of = {id(m.weight): m.weight_spec.bits_per_weight(m.in_features)
               for m in model.modules() if isinstance(m, (FakeQuantLinear, LLMInt8Linear))}
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


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes the model really holds: every distinct parameter and buffer (packed integers included)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def baseline_key(cfg: DictConfig, windows: torch.Tensor) -> str:
    """Identifies a baseline: the model, the exact evaluation windows and the task settings (local task files
    by their contents)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    tasks = {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.limit, "num_fewshot": cfg.eval.num_fewshot}
    if cfg.eval.task_data:
        tasks["task_data"] = {task: {split: hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]
                                     for split, path in files.items()} for task, files in task_data(cfg).items()}
    blob = json.dumps({"model": model, "data": cfg.data.name, "path": cfg.data.path, "windows": digest, **tasks,
                       "metrics_version": BASELINE_METRICS_VERSION}, sort_keys=True)
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


def task_data(cfg: DictConfig) -> dict[str, dict[str, str]]:
    """``eval.task_data`` as plain dicts ({hub task: {split: local file}})."""
    return OmegaConf.to_container(cfg.eval.task_data, resolve=True)


def check_tasks(cfg: DictConfig) -> None:
    """Resolve ``eval.tasks`` (and their local ``eval.task_data``) before any model loads: an unknown or
    unreachable task, or a bad local file, fails in one line."""
    if not cfg.eval.tasks and not cfg.eval.task_data:
        return
    from ptq.eval.harness import TaskUnavailableError, load_tasks

    try:
        load_tasks(list(cfg.eval.tasks), task_data(cfg))
    except (ValueError, TaskUnavailableError) as error:
        raise ConfigError(str(error)) from None


def skeleton(cfg: DictConfig) -> tuple[torch.nn.Module, Mapping]:
    """The model's modules without its weights (on the meta device) and its mapping, from the config alone."""
    if cfg.model.kind == "classifier":
        return digits.DigitsMLP(), digits.MAPPING
    from transformers import AutoModelForCausalLM

    if cfg.model.random_init is not None:
        options = OmegaConf.to_container(cfg.model.random_init, resolve=True)
        config = random_llama_config(len(load_tokenizer(resolve_source("smollm2-135m"))), **options)
    else:
        config = load_config(resolve_source(cfg.model.source, cfg.model.gguf_file))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, mapping_for(model)


def export_plan(cfg: DictConfig, steps: list[Any]) -> ExportPlan:
    """What the method will make of the model's Linears, for the exporter to check before the model loads."""
    model, mapping = skeleton(cfg)
    names = [f"{index}.{name}" for index in range(len(blocks_of(model, mapping))) for name in mapping.linear_names]
    blocks = blocks_of(model, mapping)
    in_features = frozenset(blocks.get_submodule(name).in_features for name in names)
    source = pretrained_source(cfg)
    local_dir = None
    if source is not None and source.kind != "hub" and not source.gguf_file:
        local_dir = Path(source.location)
    model_type = getattr(getattr(model, "config", None), "model_type", "digits_mlp")
    schemes = tuple(scheme for step in steps if hasattr(step, "schemes") for scheme in step.schemes())
    dtype = DTYPES.get(cfg.model.dtype, torch.float32) if source is None else \
        checkpoint_dtype(source, cfg.model.dtype)
    return ExportPlan(schemes, in_features, dtype, model_type, source_gguf(cfg), local_dir, export_options(cfg))


def export_options(cfg: DictConfig) -> dict[str, Any]:
    """The export group's options: its keys besides ``name``."""
    return {key: value for key, value in OmegaConf.to_container(cfg.export, resolve=True).items() if key != "name"}


def pretrained_source(cfg: DictConfig) -> ResolvedSource | None:
    """Where a pretrained language model's weights come from; None for random models and the classifier."""
    if cfg.model.kind != "causal_lm" or cfg.model.random_init is not None:
        return None
    return resolve_source(cfg.model.source, cfg.model.gguf_file)


def source_gguf(cfg: DictConfig) -> Path | None:
    """The GGUF file whose tokenizer and metadata an export can carry over: the model's own, or for a random Llama
    the embedded model's (whose tokenizer it speaks); None otherwise."""
    if cfg.model.kind == "causal_lm" and cfg.model.random_init is not None:
        return embedded_gguf()
    source = pretrained_source(cfg)
    return Path(source.location) / source.gguf_file if source is not None and source.gguf_file else None


def check_export(cfg: DictConfig, steps: list[Any]) -> Exporter | None:
    """The run's exporter, after it has accepted every scheme of the method (one-line error otherwise)."""
    if cfg.export.name == EXPORT_NONE:
        return None
    if not steps:
        raise ConfigError(f"export={cfg.export.name}: method={cfg.method.name} quantizes nothing to export; "
                          f"allowed is export={EXPORT_NONE} (or a method with steps)")
    exporter = EXPORTERS[cfg.export.name]
    online = [step.name for step in steps if online_modules(step)]
    if online and not exporter.stores_online_modules:
        keeping = [name for name, other in EXPORTERS.items() if other.stores_online_modules]
        raise ConfigError(f"export={cfg.export.name}: method={cfg.method.name} adds run-time modules "
                          f"({', '.join(online)}: online Hadamards, a quantized KV cache) that this format cannot "
                          f"store; allowed are export={', '.join([*keeping, EXPORT_NONE])}, or rotation with "
                          "r3=false r4=false attention_output_hadamard=false and no kv_cache step")
    for key, value in export_options(cfg).items():
        if key not in exporter.options:
            allowed = ", ".join(exporter.options) or "none"
            raise ConfigError(f"export.{key}: unknown option of export={exporter.name}; allowed are {allowed}")
        if value not in exporter.options[key]:
            raise ConfigError(f"export.{key}={value!r}: allowed are {', '.join(exporter.options[key])}")
    try:
        exporter.check(export_plan(cfg, steps))
    except ExportError as error:
        raise ConfigError(str(error)) from None
    return exporter


def online_modules(step: Any) -> bool:
    """Whether a step leaves modules that run at inference besides the quantized Linears: a KV-cache quantizer, or
    a rotation's online Hadamards (R3, R4, QuaRot's o_proj one); offline rotations only change the weights."""
    if step.name == "kv_cache":
        return True
    return step.name == "rotation" and any(getattr(step, key, False)
                                           for key in ("r3", "r4", "attention_output_hadamard"))


def write_export(exporter: Exporter, model: torch.nn.Module, output_dir: Path, context: ExportContext,
                 size: dict[str, float]) -> dict[str, Any]:
    """Write the export into ``output_dir/export``; an ``export`` folder already there is kept as
    ``export.previous-<n>``. Returns what results.json records: format, path, size on disk beside fp16/fp32."""
    target = output_dir / "export"
    staging = output_dir / "export.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = exporter.write(model, staging, context)
    if target.exists():
        previous = next(output_dir / f"export.previous-{n}" for n in range(1, 1000)
                        if not (output_dir / f"export.previous-{n}").exists())
        target.rename(previous)
        print(f"kept the earlier export as {previous}")
    staging.rename(target)
    path = target / written.relative_to(staging)
    on_disk = files_size(target) / 2**20
    return {"format": exporter.name, "path": str(path), "mb": on_disk, "fp16_mb": size["fp16_mb"],
            "fp32_mb": size["fp16_mb"] * 2, "x_smaller_than_fp16": size["fp16_mb"] / on_disk,
            **context.extra}


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run one configured experiment; write ``results.json`` into ``output_dir`` and return the results."""
    distributed.init_from_env()
    steps = validate(cfg)
    check_tasks(cfg)
    exporter = check_export(cfg, steps)
    check_lazy(cfg, steps, exporter)
    done = completed_results(output_dir)
    if distributed.broadcast_flag(done is not None and done.get("config") == OmegaConf.to_container(cfg, resolve=True)):
        if not distributed.is_main():
            return worker_results()
        print(f"skipping: {output_dir / 'results.json'} is complete for this config")
        print(summary_table(done))
        return done
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    timer = Timer()
    container = OmegaConf.to_container(cfg, resolve=True)
    logger = container["logger"] if distributed.is_main() else {**container["logger"], "name": "none"}
    tracker = Tracker(logger, container, output_dir, run_name(cfg))

    with timer.stage("load"):
        work = WORKLOADS[cfg.model.kind](cfg, device)
    model, samples, windows, evaluate = work.model, work.samples, work.eval_data, work.evaluate
    probe = Diagnostics() if cfg.diagnostics else None

    baseline, from_cache = {}, False
    if cfg.eval.baseline and steps and distributed.is_main():
        with timer.stage("eval_baseline"):
            baseline, from_cache = cached_baseline(cfg, windows, evaluate)

    layers: dict[str, Any] = {}
    if steps:
        with timer.stage("calibrate"):
            for step in steps:
                if hasattr(step, "prepare"):  # a step that sees the whole model first (mixed precision's pre-pass)
                    step.prepare(model, work.mapping, samples, cfg.data.batch_size, device)
            layers = calibrate(model, work.mapping, distributed.shard(samples), probe.wrap(steps) if probe else steps,
                               device, cfg.data.batch_size, cfg.method.propagate, cfg.progress, work.blocks)
    if not distributed.is_main():  # rank 0 evaluates, logs and writes; the others wait for it
        distributed.finish()
        return worker_results()
    size = model_size(model)
    source = pretrained_source(cfg)
    if not steps and source is not None and source.kind != "hub":
        size["checkpoint_mb"] = files_size(Path(source.location) / (source.gguf_file or "")) / 2**20
    exported = None
    if exporter is not None:
        with timer.stage("export"):
            exported = write_export(exporter, model, output_dir, work.export_context, size)
    if cfg.backend != "fake":
        from ptq.packed import convert

        with timer.stage("convert"):
            model = convert(model, cfg.backend)
        size["packed_mb"] = stored_bytes(model) / 2**20

    with timer.stage("eval_quantized"):
        quantized = evaluate()
    learning = {step.name: record for step in steps if hasattr(step, "learning") and (record := step.learning())}

    results = {
        "config": container,
        "method": cfg.method.name,
        "metrics": {"baseline": baseline, "quantized": quantized},
        "baseline_from_cache": from_cache,
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": work.eval_tokens,
        "size": size,
        "export": exported,
        "timings_s": timer.seconds,
        "layers": layers,
        "learning": learning,
        "versions": versions(),
        "git_commit": git_commit(),
        "wandb_dir": tracker.directory,
        "complete": True,
    }
    path = write_results(output_dir, results)
    tracker.log_layers(layers)
    if probe is not None:
        tracker.log_images(probe.write_plots(layers, output_dir))
    for name, record in learning.items():
        tracker.log_curve(f"{name}/loss", record["losses"])
        tracker.log_images({f"{name}/loss_curve": plot_learning_curve(
            record["losses"], f"{cfg.method.name}: {name} loss while learning", output_dir / f"{name}_loss.png")})
    tracker.finish(flat_summary(results), path)
    print(summary_table(results))
    distributed.finish()
    return results


def worker_results() -> dict[str, Any]:
    """What ``run`` returns on ranks other than 0, which calibrate but write nothing."""
    return {"rank": distributed.rank(), "metrics": {"quantized": {}}, "complete": False}


def run_name(cfg: DictConfig) -> str:
    group = f"g{cfg.group_size}" if cfg.group_size else "channel"
    grid = "" if cfg.format == "int" else f"-{cfg.format}"
    return f"{cfg.model.name}-{cfg.method.name}-w{cfg.bits}{group}{grid}"


def flat_summary(results: dict[str, Any]) -> dict[str, Any]:
    summary = {f"{stage}/{metric}": value for stage, metrics in results["metrics"].items()
               for metric, value in metrics.items()}
    summary.update({f"size/{k}": v for k, v in results["size"].items()})
    if results.get("export"):
        summary.update({f"export/{k}": v for k, v in results["export"].items()})
    summary.update({f"time/{k}": v for k, v in results["timings_s"].items()})
    return summary
