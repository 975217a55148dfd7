"""The ``kv_cache`` step: keys and values quantized after RoPE in every block (QuaRot, Ashkboos et al. 2024, §4
"KV cache": asymmetric 4-bit, one scale per token and head, clip ratio 0.95 in the authors' runs).

It attaches ``ptq.kv_cache.KVQuantizer`` modules block by block, so the engine's propagation, and a GPTQ step after
it, see each block's attention computed from the quantized cache. Place it after the rescalers (a rotation's R3
rotates the keys before they are quantized) and before the weight quantizer. ``scheme_label`` names what a method's
steps make of the model: W4A4KV4 and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ptq.calibrate import BlockContext
from ptq.kv_cache import KVQuantizer, KVSpec, attention_hooks, head_dim_of


def kv_spec(fields: dict[str, Any] | None, key: str) -> KVSpec | None:
    """A KVSpec from its config dict (None stays None); errors name ``key``."""
    if fields is None:
        return None
    allowed = set(KVSpec.__dataclass_fields__)
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"{key}.{sorted(unknown)[0]}: unknown key; allowed are {', '.join(sorted(allowed))}")
    try:
        return KVSpec(**fields)
    except ValueError as error:
        raise ValueError(f"{key}.{error}") from None


@dataclass
class KVCache:
    """``key`` and ``value``: KVSpec fields (bits, symmetric, granularity head|group|token, group_size,
    clip_ratio), or null to leave that one in full precision."""

    key: dict[str, Any] | None = None
    value: dict[str, Any] | None = None
    name: str = "kv_cache"

    needs_data: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.key_spec = kv_spec(self.key, "key")
        self.value_spec = kv_spec(self.value, "value")
        if self.key_spec is None and self.value_spec is None:
            raise ValueError("key=null, value=null: allowed is a spec for at least one of them")

    def apply(self, ctx: BlockContext) -> None:
        attention = ctx.module(ctx.mapping.attention)
        hooks = attention_hooks(attention, ctx.mapping.kv_hook)
        head_dim = head_dim_of(attention)
        device = next(attention.parameters()).device
        if self.key_spec is not None:
            hooks.key = KVQuantizer(self.key_spec, head_dim).to(device)
        if self.value_spec is not None:
            hooks.value = KVQuantizer(self.value_spec, head_dim).to(device)

    def describe(self) -> str:
        """e.g. ``KV4`` (same bits), ``K4V8``, ``K4`` (values in full precision)."""
        key = self.key_spec.bits if self.key_spec is not None else None
        value = self.value_spec.bits if self.value_spec is not None else None
        if key == value:
            return f"KV{key}"
        return "".join(f"{name}{bits}" for name, bits in (("K", key), ("V", value)) if bits is not None)


def scheme_label(steps: list[Any]) -> str:
    """What the steps make of the model, e.g. ``W4A4KV4``, ``W4A8``, ``W4``: the last weight spec's bits, its
    activations' bits (if quantized) and the kv_cache step's."""
    label = ""
    weighted = [step for step in steps if getattr(step, "weight", None) is not None and hasattr(step, "schemes")]
    if weighted:
        label = f"W{weighted[-1].weight.bits}"
        activations = getattr(weighted[-1], "activations", None)
        if activations is not None:
            label += f"A{activations.bits}"
    caches = [step.describe() for step in steps if isinstance(step, KVCache)]
    return label + "".join(caches[-1:])
