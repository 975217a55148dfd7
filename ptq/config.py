"""The typed configuration tree (Hydra structured configs) and its validation.

``register_configs`` puts the schema in Hydra's ConfigStore, so a value of the wrong type fails while the
config is composed; ``validate`` checks ranges and names and builds the method's steps — all before a model
is loaded — and raises ``ConfigError`` with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ptq.formats import FORMATS
from ptq.spec import MAX_BITS, MIN_BITS, SCALE_DTYPES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("fake", "torch", "triton")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
PROPAGATE = ("quantized", "fp")
MODEL_KINDS = ("causal_lm", "classifier")  # ptq.pipeline.WORKLOADS
AUTO = "auto"
METHOD_NONE = "none"  # configs/method/none.yaml: no steps, evaluate the loaded checkpoint


class ConfigError(ValueError):
    """Bad input, reported as one line before any heavy work."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    kind: str = "causal_lm"
    source: str = "smollm2-135m"
    gguf_file: str | None = None
    dtype: str = "float32"  # auto: the checkpoint's own dtype
    random_init: dict[str, Any] | None = None
    lazy: Any = "auto"  # true | false | auto: load one block at a time (ptq.models.lazy)
    lazy_threshold_gb: float = 4.0  # auto: lazy for local safetensors checkpoints larger than this


@dataclass
class DataConfig:
    name: str = "pydoc"
    path: str | None = None
    n_samples: int = 64
    seq_len: int = 512
    batch_size: int = 8


@dataclass
class MethodConfig:
    name: str = MISSING
    steps: list[Any] = field(default_factory=list)
    propagate: str = "quantized"


@dataclass
class EvalConfig:
    seq_len: int = 512
    max_windows: int | None = None
    batch_size: int = 4
    baseline: bool = True
    cache_dir: str = "~/.cache/ptq/baselines"
    tasks: list[str] = field(default_factory=list)
    task_data: dict[str, dict[str, str]] = field(default_factory=dict)
    limit: float | None = None
    num_fewshot: int | None = None


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "ptq"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: str = "auto"
    format: str = "int"
    seed: int = 0
    device: str = "auto"
    backend: str = "fake"
    progress: bool = True
    diagnostics: bool = False
    sweep_name: str = "sweep"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    observer: dict[str, Any] = field(default_factory=lambda: {"name": "minmax"})
    export: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def granularity_of(group_size: int | None) -> str:
    """``group_size: null`` means one (scale, zero) per output channel."""
    return "channel" if group_size is None else "group"


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=Config)
    OmegaConf.register_new_resolver("granularity", granularity_of, replace=True)


def _choice(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed are {', '.join(allowed)}")


def _positive(key: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r}: allowed is a positive integer" + (" or null" if optional else ""))


def validate(cfg: DictConfig) -> list[Any]:
    """Check every value that can be checked without loading a model; return the built method steps."""
    from ptq.data import DATASETS
    from ptq.export import EXPORT_NONE, EXPORTERS
    from ptq.models.loading import MODEL_DTYPES, ModelSourceError, check_available, resolve_source
    from ptq.transforms import build_steps

    if not isinstance(cfg.bits, int) or not MIN_BITS <= cfg.bits <= MAX_BITS:
        raise ConfigError(f"bits={cfg.bits!r}: allowed are integers {MIN_BITS}..{MAX_BITS}")
    _positive("group_size", cfg.group_size, optional=True)
    _choice("device", cfg.device, DEVICES)
    _choice("backend", cfg.backend, BACKENDS)
    _choice("model.dtype", cfg.model.dtype, MODEL_DTYPES)
    _choice("model.kind", cfg.model.kind, MODEL_KINDS)
    _choice("data.name", cfg.data.name, tuple(DATASETS))
    for key in ("n_samples", "seq_len", "batch_size"):
        _positive(f"data.{key}", cfg.data[key])
    for key in ("seq_len", "batch_size"):
        _positive(f"eval.{key}", cfg.eval[key])
    _positive("eval.max_windows", cfg.eval.max_windows, optional=True)
    _choice("method.propagate", cfg.method.propagate, PROPAGATE)
    _choice("logger.name", cfg.logger.name, LOGGERS)
    _choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    if cfg.data.name == "text" and not (cfg.data.path and Path(cfg.data.path).expanduser().is_file()):
        raise ConfigError(
            f"data.path={cfg.data.path!r}: no such file; allowed is an existing UTF-8 text file (data=text)"
        )
    if cfg.model.random_init is None and cfg.model.kind == "causal_lm":
        try:
            check_available(resolve_source(cfg.model.source, cfg.model.gguf_file))
        except ModelSourceError as error:
            raise ConfigError(str(error)) from None
    _choice("export.name", cfg.export.name, (EXPORT_NONE, *EXPORTERS))
    _choice("scale_dtype", cfg.scale_dtype, (AUTO, *SCALE_DTYPES))
    steps = OmegaConf.to_container(cfg.method.steps, resolve=True)
    if not steps and cfg.method.name != METHOD_NONE:
        raise ConfigError(f"method.steps=[]: method={cfg.method.name} needs at least one step "
                          f"(method={METHOD_NONE} evaluates a checkpoint as loaded)")
    _choice("format", cfg.format, tuple(FORMATS))
    if FORMATS[cfg.format].is_float and cfg.backend != "fake":
        raise ConfigError(f"backend={cfg.backend}: format={cfg.format} runs as fake-quantization (the packed kernels "
                          "are integer); allowed is backend=fake")
    try:
        built = build_steps(steps, OmegaConf.to_container(cfg.observer, resolve=True), scale_dtype(cfg), cfg.format)
    except ValueError as error:
        raise ConfigError(f"format={cfg.format}: {error}" if cfg.format != "int" else str(error)) from None
    return built


def scale_dtype(cfg: DictConfig) -> str:
    """``scale_dtype``, with ``auto`` resolved to what ``export`` stores exactly (``ptq.export.exact_scale_dtype``)."""
    from ptq.export import exact_scale_dtype
    from ptq.models.loading import DTYPES, checkpoint_dtype, resolve_source

    if cfg.scale_dtype != AUTO:
        return cfg.scale_dtype

    def model_dtype() -> torch.dtype:
        if cfg.model.random_init is not None or cfg.model.kind != "causal_lm":
            return DTYPES.get(cfg.model.dtype, torch.float32)
        return checkpoint_dtype(resolve_source(cfg.model.source, cfg.model.gguf_file), cfg.model.dtype)

    return exact_scale_dtype(cfg.export.name, model_dtype)


def group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


MULTIRUN_FLAGS = ("-m", "--multirun")


def preflight(arguments: list[str]) -> None:
    """Compose the config from the command line once, so that a bad override fails in one line.

    Hydra reports composition errors over several lines; this turns them into ``ConfigError``. A multirun's
    overrides are sweeps, which only Hydra expands: there, only config-group choices are checked up front.
    """
    check_group_overrides(arguments)
    if any(a in MULTIRUN_FLAGS for a in arguments) or any(a.startswith("-") for a in arguments):
        return
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose("config", overrides=[a for a in arguments if not a.startswith("hydra.")])
    except Exception as error:  # noqa: BLE001 - every composition error becomes one line
        raise ConfigError(_one_line(error)) from None


def _one_line(error: BaseException) -> str:
    """The innermost cause of a Hydra/OmegaConf error as "key: message" on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(getattr(error, "msg", None) or error).strip().splitlines()[0]
    key = getattr(error, "full_key", None)
    if re.match(r"Key '[^']*' (is )?not in ", message):  # an override of a key the config does not have
        message += ("; allowed are the config's keys (python run.py --cfg job lists them), or +key=value to add one "
                    "where the config takes new keys (e.g. +eval.task_data.<task>.test=<file>)")
    return f"{key}: {message}" if key else message


def check_group_overrides(arguments: list[str]) -> None:
    """Reject ``group=value`` overrides that name no config file, in one line (Hydra's own error is long)."""
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    for argument in arguments:
        key, sep, value = argument.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        allowed = group_options(key)
        for choice in value.split(","):
            if choice and choice not in allowed and choice != "null":
                raise ConfigError(f"{key}={choice!r}: allowed are {', '.join(allowed)}")
