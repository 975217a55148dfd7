"""The online modules a quantized model computes with at run time, as a checkpoint records and rebuilds them.

QuaRot (Ashkboos et al. 2024, §4) and SpinQuant (Liu et al. 2024, §3.2) leave two kinds of modules that no weight
can absorb: Hadamard transforms of a Linear's input (R4 before ``down_proj``, QuaRot's Hadamard over all heads
before ``o_proj``; ``ptq.nn.set_input_transform``) and what runs on an attention's queries, keys and values after
RoPE (R3 and the KV-cache quantizers; ``ptq.kv_cache.AttentionHooks``). Both are fixed by a few numbers — the
Hadamard's size, the KV specs — so a checkpoint stores those numbers, not tensors, and ``install_online_modules``
puts the same modules back (a Hadamard is deterministic: ``ptq.hadamard.OnlineHadamard(n)``).

An entry is ``{"kind": "input_hadamard", "n": n}`` for a Linear, or ``{"kind": "attention", "rotation": n | None,
"key": KVSpec fields | None, "value": KVSpec fields | None}`` for an attention module, keyed by module name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ptq.hadamard import OnlineHadamard
from ptq.kv_cache import HOOKS, AttentionHooks, KVQuantizer, KVSpec, attention_hooks, head_dim_of
from ptq.nn import set_input_transform

INPUT_HADAMARD = "input_hadamard"
ATTENTION = "attention"


def _spec_fields(quantizer: KVQuantizer | None) -> dict[str, Any] | None:
    return None if quantizer is None else dataclasses.asdict(quantizer.spec)


def _size(rotation: nn.Module | None) -> int | None:
    if rotation is not None and not isinstance(rotation, OnlineHadamard):
        raise TypeError(f"{type(rotation).__name__}: only OnlineHadamard rotations can be stored")
    return None if rotation is None else rotation.n


def online_module_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every online module of ``model``, by the name of the module that runs it (empty for most methods)."""
    entries: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        transform = getattr(module, "input_transform", None)
        if transform is not None:
            entries[name] = {"kind": INPUT_HADAMARD, "n": _size(transform)}
        hooks = getattr(module, HOOKS, None)
        if isinstance(hooks, AttentionHooks):
            entries[name] = {"kind": ATTENTION, "rotation": _size(hooks.rotation),
                             "key": _spec_fields(hooks.key), "value": _spec_fields(hooks.value)}
    return entries


def _install_input_hadamard(module: nn.Module, entry: dict[str, Any], kv_hook: str) -> None:
    set_input_transform(module, OnlineHadamard(entry["n"]))


def _install_attention(module: nn.Module, entry: dict[str, Any], kv_hook: str) -> None:
    hooks = attention_hooks(module, kv_hook)
    head_dim = head_dim_of(module)
    if entry["rotation"] is not None:
        hooks.rotation = OnlineHadamard(entry["rotation"])
    if entry["key"] is not None:
        hooks.key = KVQuantizer(KVSpec(**entry["key"]), head_dim)
    if entry["value"] is not None:
        hooks.value = KVQuantizer(KVSpec(**entry["value"]), head_dim)


INSTALLERS: dict[str, Callable[[nn.Module, dict[str, Any], str], None]] = {
    INPUT_HADAMARD: _install_input_hadamard, ATTENTION: _install_attention}


def install_online_modules(model: nn.Module, entries: dict[str, dict[str, Any]], kv_hook: str) -> None:
    """Put back the online modules ``online_module_entries`` recorded (before the quantized Linears are rebuilt,
    which keep an input transform); ``kv_hook`` is the family mapping's way into its attention
    (``ptq.kv_cache.INSTALLERS``)."""
    for name, entry in entries.items():
        INSTALLERS[entry["kind"]](model.get_submodule(name), entry, kv_hook)
