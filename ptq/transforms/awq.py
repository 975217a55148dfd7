"""AWQ: activation-aware weight scaling and clipping before low-bit weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration". A few input channels carry large activations; the weights that read them
matter most. Scaling such a weight column up by s > 1 before quantizing (and the activation down by 1/s) cuts its
relative rounding error (§3.2, eq. 1–3): Q(w·s)·(x/s). Per smoothing group (``ptq.models.mappings``):

- §3.2, scale search (eq. 4–5): s = s_X^α with s_X = mean |x_j| over the calibration tokens, for α on a grid of
  ``grid`` points in [0, 1) (α = 0 is s = 1, no scaling); s is normalised by √(max s · min s) as in the
  reference code. For each α every linear of the group becomes Q(W·diag(s))·diag(s)⁻¹, the ``inspect`` module is
  run on its captured inputs, and the α with the least MSE to the full-precision output wins; 1/s is folded into
  ``prev`` and s into the linears (``ptq.transforms.scaling``). When the inspected module is the group's only
  linear (down_proj), its output error comes from the inputs' Gram matrix, without running it
  (``linear_output_mse``). ``search_dtype`` runs a copy of the inspected module in lower precision (bfloat16
  matmuls are ~3.7x faster than float32 on a CPU with AVX512-BF16; on a GPU the model usually is bf16 already);
  W·s is always quantized from the original weights, only the error measurement is in that precision.
- §3.3 / the reference's ``auto_clip``: per linear (q and k skipped, their outputs only meet through softmax),
  per output row and weight group, shrink the range max|w| by 1 − i/``clip_grid`` for i < ``max_shrink``·clip_grid
  (1.0, 0.95, …, 0.55) and keep the ratio whose quantized partial output Σ_k x_k ŵ_k over ``clip_tokens`` sampled
  tokens is closest to the original; the weights are clamped to it.

AWQ is a rescaler: it changes weights but does not quantize them; a following ``rtn`` or ``gptq`` step with the
same weight spec decides the integers. Without ``clip_search`` the full-precision model is unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptq import distributed
from ptq.affine import expand, fake_quantize, minmax_qparams, slots
from ptq.calibrate import BlockContext, main_input, map_tensors
from ptq.models.mappings import Group
from ptq.observers import build_observer
from ptq.spec import QuantSpec
from ptq.transforms.base import check_observer
from ptq.transforms.gptq import gram
from ptq.transforms.scaling import ChannelStat, apply_scales, scalable_groups

MIN_SCALE = 1e-4
SEARCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ScaleSearch:
    """The grid of one group's scale search: the output MSE at every α, and the winning scales."""

    alphas: tuple[float, ...]
    errors: tuple[float, ...]
    scales: torch.Tensor  # s for the best α, [in]

    @property
    def best(self) -> int:
        return min(range(len(self.errors)), key=self.errors.__getitem__)


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^α (eq. 5), normalised so that max s · min s = 1."""
    s = x_mean.float().pow(alpha).clamp_min(MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(linears: Sequence[nn.Module], x_mean: torch.Tensor, output_error: Callable[[], float],
                  quantize: Callable[[torch.Tensor], torch.Tensor], grid: int = 20,
                  sources: Sequence[torch.Tensor] | None = None, tokens: int = 1) -> ScaleSearch:
    """Grid-search α (eq. 5): the s that minimises ``output_error()`` with every linear at Q(W·s)/s.

    ``output_error`` measures the inspected module's output against full precision with the linears' current
    weights (``output_mse``, ``linear_output_mse``); ``quantize`` fake-quantizes a weight. W is the linears' own
    weight, or ``sources`` (the full-precision weights when the linears are a lower-precision copy). The linears'
    weights are restored before returning. In a data-parallel run each rank's errors (means over its ``tokens``
    calibration tokens) are combined into the error over all ranks' tokens, so every rank picks the same α.
    """
    originals = [linear.weight.data for linear in linears]
    sources = originals if sources is None else sources
    alphas = tuple(i / grid for i in range(grid))
    errors = []
    try:
        for alpha in alphas:
            s = awq_scales(x_mean, alpha)
            for linear, weight, source in zip(linears, originals, sources, strict=True):
                linear.weight.data = (quantize(source.float() * s) / s).to(weight.dtype)
            errors.append(output_error())
    finally:
        for linear, weight in zip(linears, originals, strict=True):
            linear.weight.data = weight
    combined, _ = distributed.weighted_mean(torch.tensor(errors, dtype=torch.float64), tokens)
    errors = combined.tolist()
    best = min(range(grid), key=errors.__getitem__)
    return ScaleSearch(alphas, tuple(errors), awq_scales(x_mean, alphas[best]))


def output_mse(run: Callable[[], torch.Tensor]) -> Callable[[], float]:
    """The mean squared difference between ``run()`` and what it returns now (call before changing weights)."""
    reference = run()
    return lambda: (run() - reference).float().pow(2).mean().item()


def linear_output_mse(linear: nn.Module, gram: torch.Tensor, tokens: int) -> Callable[[], float]:
    """``output_mse`` of a single linear on inputs X [tokens, in], from their Gram matrix G = XᵀX alone:

        ‖X ΔWᵀ‖² = tr(ΔW G ΔWᵀ),   ΔW = W_now − W_then,

    one [out, in] × [in, in] product per call instead of a pass over all tokens (the bias cancels).
    """
    original = linear.weight.data.float().clone()

    def error() -> float:
        delta = linear.weight.data.float() - original
        return float(((delta @ gram) * delta).sum()) / (tokens * delta.shape[0])

    return error


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5,
                rows: int = 256) -> torch.Tensor:
    """Per (output row, weight group) clip value max|w|·(1 − i/grid), i < max_shrink·grid, minimising the MSE of
    the group's quantized partial outputs over the tokens ``x`` [tokens, in]. Returns [out, n_groups]
    (``spec``'s slot shape); the weight is quantized min/max within the clipped range."""
    xs = slots(x.float(), spec, pad=0.0)  # [tokens, groups, group_size]; padding contributes nothing
    best_all = []
    for chunk in weight.float().split(rows):
        ws = slots(chunk, spec)
        reference = torch.einsum("tgk,ogk->otg", xs, ws)
        org_max = ws.abs().amax(dim=-1)
        best_max, best_err = org_max.clone(), torch.full_like(org_max, math.inf)
        for i in range(int(max_shrink * grid)):
            max_val = org_max * (1 - i / grid)
            clipped = clip(chunk, max_val, spec)
            quantized = fake_quantize(clipped, *minmax_qparams(clipped, spec), spec)
            err = (torch.einsum("tgk,ogk->otg", xs, slots(quantized, spec)) - reference).pow(2).mean(dim=1)
            err, _ = distributed.weighted_mean(err, xs.shape[0])  # over every rank's tokens
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        best_all.append(best_max)
    return torch.cat(best_all)


def clip(weight: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` clamped to [−max_val, max_val], with ``max_val`` in ``spec``'s slot shape."""
    bound = expand(max_val, spec, weight.shape[-1]).to(weight.dtype)
    return torch.maximum(torch.minimum(weight, bound), -bound)


def first_sequences(calls: list[tuple[tuple, dict]], samples: int | None) -> list[tuple[tuple, dict]]:
    """The leading calls (calibration batches) that hold at least ``samples`` sequences; all when None.

    Calibration windows are drawn at random, so the first batches are a random subset of them.
    """
    if samples is None:
        return calls
    kept, seen = [], 0
    for args, kwargs in calls:
        if seen >= samples:
            break
        kept.append((args, kwargs))
        seen += main_input(args, kwargs).shape[0]
    return kept


def _relative(name: str, root: str) -> str:
    """``name`` (a path in the block) as seen from module ``root`` ("" = the block itself)."""
    return name[len(root) + 1 :] if root else name


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor inside it (tuples, dicts) converted to ``dtype``."""
    return map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)


def first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class AWQ:
    """The AWQ step on the block-wise engine: scale search per group, then (``clip_search``) the clip search."""

    weight: QuantSpec
    observer: str = "minmax"
    observer_options: dict[str, Any] = field(default_factory=dict)
    grid: int = 20
    clip_search: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj", "query", "key", "qkv", "c_attn")
    search_samples: int | None = None  # calibration sequences the scale search evaluates (None: all of them)
    search_dtype: str = "float32"  # precision the inspected module runs in during the scale search
    name: str = "awq"
    searches: dict[str, ScaleSearch] = field(default_factory=dict, init=False)  # "<block>.<prev>" → grid

    needs_data: ClassVar[bool] = True
    rescaler: ClassVar[bool] = True  # changes weights without quantizing them: must run before a quantizer

    def __post_init__(self) -> None:
        check_observer(self.observer, self.observer_options, "observer.name")
        self.clip_skip = tuple(self.clip_skip)
        allowed = ("group", "channel") if self.clip_search else ("group", "channel", "tensor")
        if self.weight.granularity not in allowed:
            raise ValueError(f"weight.granularity={self.weight.granularity!r}: allowed for awq with "
                             f"clip_search={self.clip_search} are {', '.join(allowed)}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise ValueError(f"search_dtype={self.search_dtype!r}: allowed are {', '.join(SEARCH_DTYPES)}")
        if self.search_samples is not None and self.search_samples < 1:
            raise ValueError(f"search_samples={self.search_samples!r}: allowed is a positive integer or null")
        for key in ("grid", "clip_grid", "clip_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r}: allowed is a positive integer")
        if not 0.0 < self.max_shrink < 1.0:
            raise ValueError(f"max_shrink={self.max_shrink!r}: allowed is 0 < max_shrink < 1")

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zero = build_observer(self.observer, self.weight, **self.observer_options)(weight)
        return fake_quantize(weight, scale, zero, self.weight)

    @torch.no_grad()
    def apply(self, ctx: BlockContext) -> None:
        groups = scalable_groups(ctx.block, ctx.mapping)
        clipped = self.clipped_linears(ctx) if self.clip_search else []
        names = list(dict.fromkeys([*(name for g in groups for name in (g.inspect, g.linears[0])), *clipped]))
        calls = ctx.capture(names) if names else {}
        input_scale: dict[str, torch.Tensor] = {}
        for group in groups:
            result = self.search_group(ctx, group, calls)
            apply_scales(ctx.block, group, result.scales)
            self.searches[ctx.qualified(group.prev)] = result
            input_scale.update(dict.fromkeys(group.linears, result.scales))
        if clipped:
            # Each scaling keeps the block's full-precision function, so a linear's input is now its captured
            # input divided by its own group's s: the clip search needs no further pass over the block.
            tokens = sum(x.shape[:-1].numel() for x in ctx.inputs)
            tokens = int(distributed.all_reduce_sum(torch.tensor(float(tokens), dtype=torch.float64)).item())
            step = max(1, tokens // self.clip_tokens)  # every rank samples its tokens at the step of all ranks
            for name in clipped:
                x = torch.cat([main_input(args, kwargs).reshape(-1, ctx.module(name).in_features)[::step]
                               for args, kwargs in calls[name]])
                self.clip_linear(ctx.module(name), x / input_scale[name].to(x) if name in input_scale else x)

    def search_group(self, ctx: BlockContext, group: Group, calls: dict[str, list[tuple[tuple, dict]]]) -> ScaleSearch:
        stat = ChannelStat("mean")
        for args, kwargs in calls[group.linears[0]]:
            stat.update(main_input(args, kwargs))
        linears = [ctx.module(n) for n in group.linears]
        searched = first_sequences(calls[group.inspect], self.search_samples)
        if group.linears == (group.inspect,):
            inputs = [main_input(args, kwargs).reshape(-1, linears[0].in_features).float() for args, kwargs in searched]
            tokens = sum(x.shape[0] for x in inputs)
            error = linear_output_mse(linears[0], sum(gram(x) for x in inputs), tokens)
            return search_scales(linears, stat.result(), error, self.quantize, self.grid, tokens=tokens)
        inspect, dtype = ctx.module(group.inspect), SEARCH_DTYPES[self.search_dtype]
        if dtype != linears[0].weight.dtype:  # run a copy in the search precision; quantize the original weights
            inspect = copy.deepcopy(inspect).to(dtype)
            searched = [(_cast(args, dtype), _cast(kwargs, dtype)) for args, kwargs in searched]
        error = output_mse(lambda: torch.cat([first_tensor(inspect(*args, **kwargs)).flatten()
                                              for args, kwargs in searched]))
        copies = [inspect.get_submodule(_relative(name, group.inspect)) for name in group.linears]
        tokens = sum(main_input(args, kwargs).shape[:-1].numel() for args, kwargs in searched)
        return search_scales(copies, stat.result(), error, self.quantize, self.grid,
                             sources=[linear.weight.data for linear in linears], tokens=tokens)

    def clipped_linears(self, ctx: BlockContext) -> list[str]:
        """The block's linears the clip search visits: all but those named in ``clip_skip`` (q, k)."""
        return [n for n in ctx.mapping.linear_names if not any(pattern in n for pattern in self.clip_skip)]

    def clip_linear(self, linear: nn.Module, x: torch.Tensor) -> None:
        """Clamp ``linear``'s weight to the clip ``search_clip`` picks on its sampled inputs ``x`` [tokens, in]."""
        weight = linear.weight.data
        max_val = search_clip(weight, x, self.weight, self.clip_grid, self.max_shrink)
        weight.copy_(clip(weight.float(), max_val, self.weight).to(weight.dtype))
