"""What every exporter shares: the plan it checks before any model loads, the context it writes with, and the
calibrated modules it reads.

An exporter never quantizes: it reads what calibration decided, from each ``FakeQuantLinear`` — the integers
``weight_int`` [out, in] (``weight_spec.code_dtype``), ``weight_scale`` and ``weight_zero`` in slot shape
(``ptq.affine``: [out, groups] or [out, 1]; float32 values that lie on ``weight_spec.scale_dtype``'s grid),
``g_idx`` (group of each input column, or None) and ``input_quantizer`` (activation spec, static qparams) — and
stores them in its format. ``check`` refuses, in one line starting ``export=<name>:``, every scheme the format
cannot hold exactly, before calibration starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ptq.nn import FakeQuantLinear
from ptq.spec import LinearScheme


class ExportError(ValueError):
    """A scheme, model or setting an export format cannot hold (one line, raised before calibration)."""


@dataclass(frozen=True)
class ExportPlan:
    """What an exporter checks before any model loads.

    ``in_features``: the input widths of the Linears the method quantizes; ``model_type``: the HF
    ``config.model_type`` (``digits_mlp`` for the classifier); ``source_gguf``: the GGUF file the model came from,
    if any (its tokenizer and metadata can be carried over); ``source_dir``: the local model directory it came
    from, if any (None for hub ids, random models and GGUF files).
    """

    schemes: tuple[LinearScheme, ...]
    in_features: frozenset[int]
    model_dtype: torch.dtype
    model_type: str
    source_gguf: Path | None = None
    source_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the export group's keys besides ``name``


@dataclass
class ExportContext:
    """What an exporter writes with besides the model: the tokenizer (None for the classifier), the source GGUF
    file (or None), a one-line description of the run (method and scheme) for the file's metadata, the export
    group's options, and ``extra``: what the exporter measured while writing (results.json records it).

    ``parts``: for a model whose blocks are not all in memory (``ptq.models.lazy``), a generator of
    (qualified prefix, module) pieces that together make the model, each loaded while the writer holds it; None
    when the model is in memory. Only exporters with ``sharded = True`` accept it."""

    tokenizer: Any = None
    source_gguf: Path | None = None
    description: str = "ptq"
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    parts: Callable[[], Iterator[tuple[str, nn.Module]]] | None = None


class Exporter(Protocol):
    name: str
    options: dict[str, tuple[str, ...]]  # option → allowed values (``export.<option>=...``)
    stores_online_modules: bool  # keeps rotations' online Hadamards and KV-cache quantizers (``ptq.export.online``)
    sharded: bool  # takes ``ExportContext.parts``: writes a lazily loaded model piece by piece

    def check(self, plan: ExportPlan) -> None:
        """Raise ``ExportError`` (one line naming ``export=<name>``, the scheme and what is allowed) unless every
        Linear of ``plan`` can be written exactly."""

    def write(self, model: nn.Module, directory: Path, context: ExportContext) -> Path:
        """Write the calibrated ``model`` into the empty ``directory``; return what a loader opens (the directory,
        or the file inside it)."""


def calibrated_linears(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Every ``FakeQuantLinear`` of ``model`` by qualified name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)}


def group_order_index(linear: FakeQuantLinear) -> torch.Tensor | None:
    """``linear.g_idx`` when its columns are not in group order (act-order), else None (the plain layout, in which
    column j belongs to group j // group_size, needs no index)."""
    if linear.g_idx is None or linear.weight_spec.granularity != "group":
        return None
    layout = torch.arange(linear.in_features, device=linear.g_idx.device) // linear.weight_spec.group_size
    return None if torch.equal(linear.g_idx.long(), layout) else linear.g_idx


def linear_scheme(linear: FakeQuantLinear) -> LinearScheme:
    """What a calibrated Linear holds, as an exporter's ``check`` judges schemes (outliers are never a
    FakeQuantLinear's)."""
    quantizer = linear.input_quantizer
    static = quantizer is not None and not quantizer.dynamic
    clip_ratio = quantizer.clip_ratio if quantizer is not None else 1.0
    return LinearScheme(linear.weight_spec, linear.input_spec, static, clip_ratio,
                        act_order=group_order_index(linear) is not None)


def refuse(name: str, reason: str, allowed: str) -> ExportError:
    """The one-line error: ``export=<name>: <reason>; allowed <allowed>``."""
    return ExportError(f"export={name}: {reason}; allowed {allowed}")


def files_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
