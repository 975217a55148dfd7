"""Rotations that remove outliers without changing the network: QuaRot and SpinQuant's R1–R4.

Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", §3 (computational invariance) and
§4 (the rotations and online Hadamards); Liu et al. 2024, "SpinQuant: LLM Quantization with Learned Rotations", §3
(the names R1–R4, Fig. 1). An orthogonal Q spreads every channel's energy over all channels, so an outlier channel
becomes many moderate ones and per-token 4-bit activations lose far less (QuaRot §3, Fig. 2).

Pre-norm RMSNorm commutes with an orthogonal Q once its weight w is folded into the linears that read it
(W ← W diag(w), w ← 1): ‖x Q‖ = ‖x‖, so RMSNorm(x Q) = RMSNorm(x) Q. Rotating every residual state h ← h Q then
keeps the function if (torch layout, W is [out, in], y = x Wᵀ + b)

    embeddings                                  E ← E Q
    readers: q, k, v, gate, up and lm_head      W ← W Q               (x Q)(W Q)ᵀ = x Wᵀ
    writers: o_proj, down_proj                  W ← Qᵀ W,  b ← b Q    their outputs land in the rotated stream

which is **R1** (QuaRot §4 "Stage 1a"; a tied lm_head is untied, since the final norm's weight is folded into the
head and not into the embeddings). **R2**, per head (SpinQuant §3.1; QuaRot's "Stage 1c" fuses a Hadamard there and
adds an online one across heads, which is not done here): values v_h ← v_h R₂ (W_v,h ← R₂ᵀ W_v,h) and o_proj's
input columns W_o[:, h] ← W_o[:, h] R₂; attention mixes tokens, not channels, so softmax(·)(V R₂) = (softmax(·) V) R₂
— one R₂ for every head also serves grouped-query attention. **R4** (QuaRot "Stage 1b", SpinQuant R4): an online
Hadamard x ← x H before down_proj with W_down ← W_down H. **R3** (QuaRot "Stage 1d", SpinQuant R3): an online
Hadamard of queries and keys after RoPE, (q H)(k H)ᵀ = q kᵀ, which makes the keys easy to quantize for the KV cache
(``ptq.kv_cache``). Online rotations are modules the model keeps (``ptq.nn.set_input_transform``,
``ptq.kv_cache.AttentionHooks``).

R1 and R2 are drawn from ``ROTATIONS[kind]`` (seeded): random Hadamard (QuaRot), plain Hadamard or random
orthogonal (``ptq.hadamard``); R3 and R4 are plain Hadamard transforms. With ``learn``, R1 and R2 start there and
are trained by Cayley SGD against the quantized network's loss (SpinQuant §3.2, ``ptq.transforms.spinquant``).

The step is a rescaler that works on the whole model at once (embeddings and head included), so it runs in
``prepare`` — before calibration, like mixed precision's pre-pass — and its per-block ``apply`` does nothing.
Only families whose blocks use pre-norm RMSNorm can be rotated (``Mapping.norm``); the others fail in one line.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.calibrate import BlockContext
from ptq.hadamard import ROTATIONS, OnlineHadamard
from ptq.kv_cache import attention_hooks, head_dim_of
from ptq.models.mappings import MAPPINGS, Mapping, blocks_of, fold_of, text_config
from ptq.nn import set_input_transform
from ptq.transforms.spinquant import CayleyOptions

UNROTATABLE = {
    "layernorm": "LayerNorm blocks (the norm subtracts the mean, which a rotation of the residual does not commute "
                 "with)",
    "sandwich": "RMSNorm on each sublayer's output before the residual add (no linear can absorb its weight)",
}

NORM_FOLDS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "norm": (lambda w: w, 1.0),
    "norm_plus_one": (lambda w: 1 + w, 0.0),
}
"""How a norm's weight scales its output (w, or Gemma's 1 + w), and the weight that makes that scale 1."""


def rotatable_families() -> list[str]:
    """The registered model types whose every layout is pre-norm RMSNorm."""
    return [name for name, entry in MAPPINGS.items()
            if all(m.norm == "rmsnorm" for m in (entry if isinstance(entry, tuple) else (entry,)))]


def check_rotatable(model: nn.Module, mapping: Mapping) -> None:
    """One-line ValueError for a family that cannot be rotated (works on a meta-device skeleton too)."""
    if mapping.norm != "rmsnorm":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"rotation: model_type={model_type!r} has {UNROTATABLE[mapping.norm]}; allowed are "
                         f"{', '.join(rotatable_families())}")


@dataclass(frozen=True)
class BlockLayout:
    """Which linears of a block read the residual (after which norm) and which write it.

    In a pre-norm block every linear either reads a norm's output (the groups led by a norm) or writes to the
    residual; the attention's last reader holds the values in its last rows (v_proj, or a fused q|k|v).
    """

    norms: tuple[tuple[str, str, tuple[str, ...]], ...]  # (norm, fold, the linears it feeds)
    value: str
    attention_output: str
    mlp_output: str

    @property
    def readers(self) -> list[str]:
        return [name for _, _, linears in self.norms for name in linears]

    @property
    def writers(self) -> list[str]:
        return [self.attention_output, self.mlp_output]


def block_layout(mapping: Mapping) -> BlockLayout:
    norms = tuple((g.prev, g.fold, g.linears) for g in mapping.groups if g.prev is not None and g.fold in NORM_FOLDS)
    readers = {name for _, _, linears in norms for name in linears}
    inside = f"{mapping.attention}."
    writers = [name for name in mapping.linear_names if name not in readers]
    attention_writers = [name for name in writers if name.startswith(inside)]
    mlp_writers = [name for name in writers if not name.startswith(inside)]
    attention_readers = [name for _, _, linears in norms for name in linears if name.startswith(inside)]
    if len(attention_writers) != 1 or len(mlp_writers) != 1 or not attention_readers:
        raise ValueError(f"rotation: the mapping's blocks ({mapping.blocks}) do not split into norm-fed readers and "
                         f"one attention and one MLP writer (writers: {writers}); allowed are pre-norm blocks")
    return BlockLayout(norms, attention_readers[-1], attention_writers[0], mlp_writers[0])


def _update(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
    """tensor ← fn(tensor), computed in float64 on ``device``."""
    tensor.copy_(fn(tensor.detach().to(device, torch.float64)).to(tensor.device, tensor.dtype))


def fuse_norm(norm: nn.Module, fold: str, linears: list[nn.Module], device: torch.device) -> None:
    """W ← W diag(scale) for every linear the norm feeds; then the norm's scale is 1 (QuaRot §4, Stage 1a)."""
    effective, identity = NORM_FOLDS[fold]
    scale = effective(norm.weight.detach().to(device, torch.float64))
    for linear in linears:
        _update(linear.weight.data, lambda w: w * scale, device)
    norm.weight.data.fill_(identity)


def times(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A reader's weight or the embeddings: W ← W Q."""
    return t @ q


def transposed_times(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A writer's weight or bias (a column): W ← Qᵀ W, b ← Qᵀ b."""
    return q.T @ t


def head_rows(t: torch.Tensor, r: torch.Tensor, rows: int) -> torch.Tensor:
    """The last ``rows`` outputs (weight rows or bias entries), in heads of r's size: W_h ← Rᵀ W_h (the values)."""
    head_dim = r.shape[0]
    last = t[-rows:]
    rotated = (r.T @ last.reshape(-1, head_dim, last[0].numel())).reshape(last.shape)
    return torch.cat([t[:-rows], rotated]) if rows < t.shape[0] else rotated


def head_columns(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Input columns in heads of r's size: W[:, h] ← W[:, h] R (o_proj)."""
    return (t.reshape(t.shape[0], -1, r.shape[0]) @ r).reshape(t.shape)


Plan = list[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]
"""(parameter name, how the parameter changes with a rotation) for every parameter one rotation touches."""


def parameter_name(model: nn.Module, parameter: torch.Tensor) -> str:
    return next(name for name, p in model.named_parameters() if p is parameter)


def _weight_and_bias(prefix: str, linear: nn.Module, fn: Callable[..., torch.Tensor], bias: bool) -> Plan:
    plan = [(f"{prefix}.weight", fn)]
    return plan + [(f"{prefix}.bias", fn)] if bias and linear.bias is not None else plan


def residual_plan(model: nn.Module, mapping: Mapping) -> Plan:
    """R1's parameters (after the norms are fused and the head untied): embeddings, readers, writers, LM head."""
    layout = block_layout(mapping)
    plan = [(parameter_name(model, model.get_input_embeddings().weight), times)]
    for index, block in enumerate(blocks_of(model, mapping)):
        prefix = f"{mapping.blocks}.{index}"
        for name in layout.readers:
            plan += _weight_and_bias(f"{prefix}.{name}", block.get_submodule(name), times, bias=False)
        for name in layout.writers:
            plan += _weight_and_bias(f"{prefix}.{name}", block.get_submodule(name), transposed_times, bias=True)
    return plan + [(parameter_name(model, model.get_output_embeddings().weight), times)]


def value_plans(model: nn.Module, mapping: Mapping) -> list[Plan]:
    """R2's parameters, one plan per block: the values' rows (and bias) of v_proj, o_proj's input columns."""
    layout = block_layout(mapping)
    blocks = blocks_of(model, mapping)
    rows = key_value_heads(model) * head_dim_of(blocks[0].get_submodule(mapping.attention))
    value_rows = partial(head_rows, rows=rows)
    return [_weight_and_bias(f"{mapping.blocks}.{index}.{layout.value}", block.get_submodule(layout.value),
                             value_rows, bias=True)
            + [(f"{mapping.blocks}.{index}.{layout.attention_output}.weight", head_columns)]
            for index, block in enumerate(blocks)]


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan, rotation: torch.Tensor, device: torch.device) -> None:
    """Every parameter of ``plan`` ← its rotated self, in float64 on ``device``."""
    rotation = rotation.to(device, torch.float64)
    for name, fn in plan:
        _update(model.get_parameter(name).data, lambda t, fn=fn: fn(t, rotation), device)


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own weight when it shares the embeddings' (and stop transformers re-tying it)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, text_config(model.config))}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(model: nn.Module, mapping: Mapping, device: torch.device) -> None:
    """Fold every block norm into its readers and the final norm into the LM head (untied first)."""
    untie_head(model)
    layout = block_layout(mapping)
    for block in blocks_of(model, mapping):
        for norm, fold, linears in layout.norms:
            fuse_norm(block.get_submodule(norm), fold, [block.get_submodule(n) for n in linears], device)
    final = model.get_submodule(f"{mapping.blocks.rpartition('.')[0]}.{mapping.final_norm}")
    fuse_norm(final, fold_of(final), [model.get_output_embeddings()], device)


@torch.no_grad()
def add_online_hadamard_before(model: nn.Module, mapping: Mapping, linear_name: str) -> tuple[Plan, torch.Tensor]:
    """x ← x H at the input of every block's ``linear_name`` (an online module): R4 before down_proj, and QuaRot's
    online Hadamard over all heads before o_proj. Returns the weights' side, W ← W H, as a (plan, H) pair: it must
    follow R2, which rotates o_proj's input columns too."""
    blocks = blocks_of(model, mapping)
    hadamard = OnlineHadamard(blocks[0].get_submodule(linear_name).in_features)
    for block in blocks:
        linear = block.get_submodule(linear_name)
        set_input_transform(linear, copy.deepcopy(hadamard).to(linear.weight.device))
    plan = [(f"{mapping.blocks}.{index}.{linear_name}.weight", times) for index in range(len(blocks))]
    return plan, hadamard.matrix()


def add_online_hadamard_on_queries_and_keys(model: nn.Module, mapping: Mapping) -> None:
    """R3: q ← q H, k ← k H after RoPE, in every block's attention (``ptq.kv_cache.AttentionHooks``)."""
    for block in blocks_of(model, mapping):
        attention = block.get_submodule(mapping.attention)
        hooks = attention_hooks(attention, mapping.kv_hook)
        hooks.rotation = OnlineHadamard(head_dim_of(attention)).to(next(attention.parameters()).device)


def key_value_heads(model: nn.Module) -> int:
    config = text_config(model.config)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def draw_rotations(model: nn.Module, mapping: Mapping, kind: str, seed: int, r1: bool, r2: bool
                   ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """R1 (hidden × hidden) and one R2 (head_dim × head_dim) per block from ``ROTATIONS[kind]``, seeded."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    first = ROTATIONS[kind](hidden, generator) if r1 else None
    blocks = blocks_of(model, mapping)
    head_dim = head_dim_of(blocks[0].get_submodule(mapping.attention))
    per_block = [ROTATIONS[kind](head_dim, generator) for _ in blocks] if r2 else None
    return first, per_block


def rotation_plans(model: nn.Module, mapping: Mapping, first: torch.Tensor | None,
                   per_block: list[torch.Tensor] | None) -> list[tuple[Plan, torch.Tensor]]:
    """(plan, rotation) pairs: R1's over the whole model, then each block's R2."""
    plans = [(residual_plan(model, mapping), first)] if first is not None else []
    if per_block is not None:
        plans += list(zip(value_plans(model, mapping), per_block, strict=True))
    return plans


@dataclass
class Rotation:
    """The ``rotation`` step: R1 (residual), R2 (per head, v → o), R3 (queries and keys, online), R4 (down_proj
    input, online) and, with ``attention_output_hadamard``, QuaRot's online Hadamard over all heads at o_proj's input
    (after R2 there, o_proj's activations are mixed across heads too). ``kind`` draws R1 and R2
    (``ptq.hadamard.ROTATIONS``) from ``seed``; ``learn`` (a dict of ``ptq.transforms.spinquant.CayleyOptions``
    fields, or null) trains them first (SpinQuant)."""

    r1: bool = True
    r2: bool = True
    r3: bool = True
    r4: bool = True
    attention_output_hadamard: bool = False
    kind: str = "random_hadamard"
    seed: int = 0
    learn: dict[str, Any] | None = None
    name: str = "rotation"
    applied: dict[str, str] = field(default_factory=dict, init=False)  # what prepare did, for the run's record
    _learner: CayleyOptions | None = field(default=None, init=False, repr=False)
    _learn_seconds: float = field(default=0.0, init=False, repr=False)

    needs_data: ClassVar[bool] = False
    rescaler: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.kind not in ROTATIONS:
            raise ValueError(f"kind={self.kind!r}: allowed are {', '.join(ROTATIONS)}")
        if not any((self.r1, self.r2, self.r3, self.r4, self.attention_output_hadamard)):
            raise ValueError("r1, r2, r3, r4, attention_output_hadamard are all false: allowed is at least one "
                             "rotation")
        if self.learn is not None:
            if not (self.r1 or self.r2):
                raise ValueError("learn: SpinQuant learns R1 and R2; allowed is r1 or r2 true")
            try:
                self._learner = CayleyOptions(**self.learn)
            except TypeError as error:
                raise ValueError(f"learn: {error}") from None

    def check_model(self, model: nn.Module, mapping: Mapping) -> None:
        """Fail in one line, before calibration (or on a meta-device skeleton before loading), for a family whose
        norms do not commute with rotations."""
        check_rotatable(model, mapping)
        block_layout(mapping)

    @torch.no_grad()
    def prepare(self, model: nn.Module, mapping: Mapping, samples: torch.Tensor, batch_size: int,
                device: torch.device | str) -> None:
        """Fuse the norms, attach the online Hadamards (R4, R3, o_proj's), learn R1 and R2 if asked, then rotate the
        weights: R1, R2, and last the online Hadamards' weight side (W ← W H after R2's W[:, h] ← W[:, h] R₂) — the
        whole model, in place."""
        self.check_model(model, mapping)
        device = torch.device(device)
        first, per_block = draw_rotations(model, mapping, self.kind, self.seed, self.r1, self.r2)
        if self.r1:
            fuse_norms(model, mapping, device)
        layout = block_layout(mapping)
        online = [name for name, on in ((layout.mlp_output, self.r4),
                                        (layout.attention_output, self.attention_output_hadamard)) if on]
        fixed = [add_online_hadamard_before(model, mapping, name) for name in online]
        if self.r3:
            add_online_hadamard_on_queries_and_keys(model, mapping)
        plans = rotation_plans(model, mapping, first, per_block)
        if self._learner is not None:
            start = time.perf_counter()
            with torch.enable_grad():
                self._learner.learn(model, mapping, plans, fixed, samples, device)
            self._learn_seconds = time.perf_counter() - start
        for plan, rotation in plans + fixed:
            apply_plan(model, plan, rotation, device)
        self.applied = self.describe_applied(model, mapping)

    def learning(self) -> dict[str, Any] | None:
        """What learning the rotations cost and reached (SpinQuant): the loss at every iteration and the seconds,
        or None for fixed rotations."""
        if self._learner is None or not self._learner.losses:
            return None
        losses = self._learner.losses
        return {"losses": losses, "iterations": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                "seconds": self._learn_seconds}

    def describe_applied(self, model: nn.Module, mapping: Mapping) -> dict[str, str]:
        """{"r1": "random_hadamard 576", ...} for the rotations applied (sizes of the first block)."""
        block = blocks_of(model, mapping)[0]
        layout = block_layout(mapping)
        head_dim = head_dim_of(block.get_submodule(mapping.attention))
        kind = f"{self.kind}{' learned' if self._learner is not None else ''}"
        sizes = {"r1": f"{kind} {model.get_input_embeddings().weight.shape[1]}", "r2": f"{kind} {head_dim}",
                 "r3": f"hadamard {head_dim}",
                 "r4": f"hadamard {block.get_submodule(layout.mlp_output).in_features}",
                 "attention_output_hadamard": f"hadamard {block.get_submodule(layout.attention_output).in_features}"}
        return {key: value for key, value in sizes.items() if getattr(self, key)}

    def apply(self, ctx: BlockContext) -> None:
        """Nothing per block: ``prepare`` rotated the whole model."""
        if not self.applied:
            raise RuntimeError("rotation: call prepare(model, mapping, samples, …) before calibrating")
