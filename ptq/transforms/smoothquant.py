"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", §4. Activations have a few channels with outliers ~100× the rest, which ruins
per-token quantization; weights are flat. Per input channel j of a group of linears (``ptq.models.mappings``),

    s_j = max|X_j|^α / max_i |W_ij|^(1−α)                                    (eq. 4)

with max|X_j| over the calibration tokens and max_i over the output rows of every linear in the group; then
Y = (X diag(s)⁻¹)(diag(s) Wᵀ) (eq. 3): 1/s is folded into the op before (norm weight and bias, or a linear's
rows) and s into the linears' input columns, so the full-precision model is unchanged. α is the migration
strength (0.5 for OPT, 0.8 for Llama-family models in the authors' repository; ``Mapping.smoothquant_alpha``
holds the family's value). With ``alpha_search`` α is picked per block from ``alpha_grid`` by the error of the
block's output once a copy of it is smoothed and quantized with the downstream ``weight`` / ``activations``
specs (the search the authors' repository describes for new models).

SmoothQuant is a rescaler: it does not quantize; a following ``rtn`` or ``gptq`` step does. As in the paper,
only the groups fed by a norm are smoothed unless ``include_linear_prev`` (v→o, up→down) is set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from ptq import distributed
from ptq.calibrate import BlockContext
from ptq.models.mappings import Group
from ptq.spec import QuantSpec
from ptq.transforms.rtn import RTN
from ptq.transforms.scaling import ChannelStat, apply_scales, group_weight, scalable_groups

MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4: s_j = max|X_j|^α / max_i|W_ij|^(1−α), for ``weight`` [out, in] (the group's linears stacked)."""
    weight_absmax = weight.abs().amax(dim=0).float().clamp_min(MIN_SCALE)
    act_absmax = act_absmax.float().clamp_min(MIN_SCALE)
    return (act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)).clamp_min(MIN_SCALE)


@dataclass
class SmoothQuant:
    """The SmoothQuant step: per block, max|X_j| of each group's inputs, then eq. 4 and the fold.

    ``alpha`` None takes the family's value from the mapping. ``weight``, ``activations`` and the observers are
    the downstream quantizer's settings, used only by ``alpha_search``.
    """

    alpha: float | None = None
    alpha_search: bool = False
    alpha_grid: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.3 … 0.95
    include_linear_prev: bool = False
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, granularity="channel"))
    activations: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=8, granularity="token"))
    observer: str = "minmax"
    observer_options: dict[str, Any] = field(default_factory=dict)
    act_observer: str | None = None
    act_observer_options: dict[str, Any] = field(default_factory=dict)
    name: str = "smoothquant"
    chosen_alpha: dict[int, float] = field(default_factory=dict, init=False)  # block index → α used

    needs_data: ClassVar[bool] = True
    rescaler: ClassVar[bool] = True  # changes weights without quantizing them: must run before a quantizer

    def __post_init__(self) -> None:
        self.alpha_grid = tuple(self.alpha_grid)
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r}: allowed is a number in [0, 1], or null for the family's value")
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"alpha_grid={list(self.alpha_grid)!r}: allowed is a non-empty list of numbers in [0, 1]")
        self._quantizer = RTN(weight=self.weight, observer=self.observer, observer_options=self.observer_options,
                              activations=self.activations, act_observer=self.act_observer,
                              act_observer_options=self.act_observer_options)

    def groups(self, ctx: BlockContext) -> list[Group]:
        return [g for g in scalable_groups(ctx.block, ctx.mapping) if self.include_linear_prev or g.fold != "linear"]

    @torch.no_grad()
    def apply(self, ctx: BlockContext) -> None:
        groups = self.groups(ctx)
        if not groups:
            return
        stats = {g.linears[0]: ChannelStat("max") for g in groups}
        ctx.stream({name: stat.update for name, stat in stats.items()})
        absmax = {g: stats[g.linears[0]].result() for g in groups}
        alpha = self.alpha if self.alpha is not None else ctx.mapping.smoothquant_alpha
        if self.alpha_search:
            alpha = self.search_alpha(ctx, absmax)
        smooth(ctx.block, absmax, alpha)
        self.chosen_alpha[ctx.index] = alpha

    def search_alpha(self, ctx: BlockContext, absmax: dict[Group, torch.Tensor]) -> float:
        """The α of the grid whose smoothed-then-quantized block output is closest (MSE) to the fp output."""
        reference = torch.cat([y.flatten() for y in ctx.outputs()])
        errors = {}
        for alpha in self.alpha_grid:
            trial = replace(ctx, block=copy.deepcopy(ctx.block), logs={})
            smooth(trial.block, absmax, alpha)
            self._quantizer.apply(trial)
            output = torch.cat([y.flatten() for y in trial.outputs()])
            errors[alpha] = (output - reference).float().pow(2).mean().item()
        combined, _ = distributed.weighted_mean(torch.tensor(list(errors.values()), dtype=torch.float64),
                                                reference.numel())  # every rank picks the α of all its tokens
        alphas, values = list(errors), combined.tolist()
        return alphas[min(range(len(alphas)), key=values.__getitem__)]


def smooth(block: torch.nn.Module, absmax: dict[Group, torch.Tensor], alpha: float) -> None:
    """Apply eq. 4's scales to every group of ``block`` (in place)."""
    for group, act in absmax.items():
        apply_scales(block, group, smoothing_scales(act, group_weight(block, group), alpha))
