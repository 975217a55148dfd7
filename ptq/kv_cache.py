"""What runs on an attention module's queries, keys and values after RoPE: the online rotation R3 and the
quantized KV cache (QuaRot, Ashkboos et al. 2024, §4 "KV cache"; SpinQuant, Liu et al. 2024, §3.2, R3).

Keys and values are fake-quantized per token: over each head's ``head_dim`` channels (``head``: one scale per
token and head, QuaRot's groups of 128 on Llama), over groups of ``group_size`` channels inside a head (``group``),
or over all heads of a token (``token``). Each token's values depend only on that token, so quantizing the keys and
values an attention call reads is the same as storing them quantized in the cache: a model evaluated without a
cache and one generating with it see the same numbers.

Where the tensors are reached (``Mapping.kv_hook``, ``INSTALLERS``):

- ``attention_interface``: the attention modules of transformers 5 (5.24 here) call ``ALL_ATTENTION_FUNCTIONS.
  get_interface(module.config._attn_implementation, ...)(module, query, key, value, mask, ...)`` after RoPE and the
  cache update.
  The attention module gets its own view of the config naming ``ptq_kv``, registered here, which applies the hooks
  and calls the implementation the model's config names (sdpa, eager, flash, ...); masks, built from the model's
  own config, stay in that implementation's format. Queries are seen, so R3 can be applied.
- ``layer_past``: Falcon's attention computes attention itself; a forward pre-hook replaces its cache argument by a
  stand-in whose ``update`` quantizes the keys and values (and stores them in the real cache, if there is one).
  Queries are not seen: no R3 there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ptq.nn import ActivationQuantizer
from ptq.spec import QuantSpec

INTERFACE_NAME = "ptq_kv"
HOOKS = "attention_hooks"  # the attribute of an attention module that holds its AttentionHooks


@dataclass(frozen=True)
class KVSpec:
    """Bits, symmetry, layout and clip ratio of the quantized keys or values (dynamic, min/max of each slot)."""

    bits: int = 4
    symmetric: bool = False
    granularity: str = "head"
    group_size: int | None = None
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.granularity not in LAYOUTS:
            raise ValueError(f"granularity={self.granularity!r}: allowed are {', '.join(LAYOUTS)}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r}: granularity=group needs a positive integer")
        self.quantizer()

    def quantizer(self) -> ActivationQuantizer:
        """The per-row quantizer of one slot layout (rows of head_dim, group_size or all heads' channels)."""
        return ActivationQuantizer(QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="token"),
                                   clip_ratio=self.clip_ratio)

    def describe(self) -> str:
        layout = f"g{self.group_size}" if self.granularity == "group" else f"per {self.granularity}"
        clip = f" clip {self.clip_ratio}" if self.clip_ratio != 1 else ""
        return f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'} {layout}{clip}"


def _per_head(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    return x


def _per_group(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _per_token(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _from_token(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = like.shape
    return rows.reshape(batch, tokens, heads, head_dim).transpose(1, 2)


LAYOUTS: dict[str, Callable[[torch.Tensor, int | None], torch.Tensor]] = {
    "head": _per_head,
    "group": _per_group,
    "token": _per_token,
}
"""[batch, heads, tokens, head_dim] → rows that share one (scale, zero)."""


class KVQuantizer(nn.Module):
    """Fake-quantizes keys or values [batch, heads, tokens, head_dim] in the slots of ``spec.granularity``."""

    def __init__(self, spec: KVSpec, head_dim: int) -> None:
        super().__init__()
        if spec.granularity == "group" and head_dim % spec.group_size:
            raise ValueError(f"group_size={spec.group_size}: allowed is a divisor of head_dim={head_dim}")
        self.spec = spec
        self.quantizer = spec.quantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.quantizer(LAYOUTS[self.spec.granularity](x, self.spec.group_size))
        return _from_token(rows, x) if self.spec.granularity == "token" else rows.reshape(x.shape)

    def extra_repr(self) -> str:
        return self.spec.describe()


class AttentionHooks(nn.Module):
    """R3 (an online rotation of queries and keys) then the key and value quantizers; each optional."""

    def __init__(self, eager: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.rotation: nn.Module | None = None
        self.key: KVQuantizer | None = None
        self.value: KVQuantizer | None = None
        self.eager = eager  # the model file's own eager attention, for models whose config names "eager"

    def forward(self, query: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        if self.rotation is not None:
            query, key = self.rotation(query), self.rotation(key)
        if self.key is not None:
            key = self.key(key)
        if self.value is not None:
            value = self.value(value)
        return query, key, value


class _ConfigView:
    """An attention module's config that names ``implementation``; every other attribute is ``base``'s."""

    def __init__(self, base: Any, implementation: str) -> None:
        self._base = base
        self._attn_implementation = implementation

    def __getattr__(self, name: str) -> Any:
        if name == "_base":  # while copying or unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self._base, name)


def quantized_kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The ``ptq_kv`` attention implementation: the module's hooks, then the model's own implementation."""
    hooks: AttentionHooks = getattr(module, HOOKS)
    query, key, value = hooks(query, key, value)
    base = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._base._attn_implementation, hooks.eager)
    return base(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(INTERFACE_NAME, quantized_kv_attention)


def _install_interface(attention: nn.Module) -> AttentionHooks:
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"kv_hook=attention_interface: {type(attention).__name__}'s module defines no "
                         "eager_attention_forward; allowed are attention modules that call transformers' "
                         "AttentionInterface")
    attention.config = _ConfigView(attention.config, INTERFACE_NAME)
    return AttentionHooks(eager)


class _QuantizingCache:
    """Stands in for an attention's cache argument: ``update`` quantizes the new keys and values, then stores them
    in the real cache (if any) and returns what it returns."""

    def __init__(self, hooks: AttentionHooks, cache: Any) -> None:
        self.hooks, self.cache = hooks, cache

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        _, key, value = self.hooks(None, key, value)
        return (key, value) if self.cache is None else self.cache.update(key, value, *args, **kwargs)


def _wrap_layer_past(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    return args, {**kwargs, "layer_past": _QuantizingCache(getattr(module, HOOKS), kwargs.get("layer_past"))}


def _install_layer_past(attention: nn.Module) -> AttentionHooks:
    attention.register_forward_pre_hook(_wrap_layer_past, with_kwargs=True)
    return AttentionHooks()


INSTALLERS: dict[str, Callable[[nn.Module], AttentionHooks]] = {
    "attention_interface": _install_interface,
    "layer_past": _install_layer_past,
}


def attention_hooks(attention: nn.Module, kv_hook: str) -> AttentionHooks:
    """The hooks of ``attention`` (installed the first time, the way ``kv_hook`` names)."""
    hooks = getattr(attention, HOOKS, None)
    if hooks is None:
        if kv_hook not in INSTALLERS:
            raise ValueError(f"kv_hook={kv_hook!r} in the mapping: allowed are {', '.join(INSTALLERS)}")
        hooks = INSTALLERS[kv_hook](attention)
        setattr(attention, HOOKS, hooks)
    return hooks


def head_dim_of(attention: nn.Module) -> int:
    """Channels per head of an attention module (every mapped family's attention has ``head_dim``)."""
    return int(attention.head_dim)
