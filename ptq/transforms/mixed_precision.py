"""Mixed-precision weights: the most sensitive Linears get more bits, under an average bit budget.

Sensitivity is the layer's output error under a diagonal Hessian (the "diagonal-Hessian" proxy of HAWQ, Dong et
al. 2019, in the form of the layer-wise objective of OBQ / GPTQ, Frantar et al. 2022, eq. 1, with H = E[x xᵀ]
replaced by its diagonal):

    E‖(W − Q_b(W)) x‖²  ≈  Ω_b(W) = Σ_j E[x_j²] · ‖W_:j − Q_b(W)_:j‖²

from one full-precision pass over the calibration data. Each Linear l with n_l weights either stays at the low
width b_lo or is raised to b_hi; raising it gains g_l = Ω_lo − Ω_hi. The budget is on the parameter-weighted mean
of the nominal widths (scales not counted):

    Σ_l n_l b_l ≤ avg_bits · Σ_l n_l.

Allocation is the greedy solution of this 0/1 knapsack (Dantzig 1957): raise layers in decreasing order of gain
per extra stored bit, g_l / (n_l (b_hi − b_lo)), while the budget allows (a layer that does not fit is skipped and
smaller ones are still tried). Each Linear is then quantized by RTN or GPTQ at its width.

The engine sees one block at a time, but the allocation is global: ``prepare`` (called by the pipeline before
calibration) runs the pre-pass over all blocks and fixes every layer's width; ``apply`` quantizes block by block.
Rescalers placed before this step change the weights after the allocation was made; their effect is not seen
by the proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ptq.affine import fake_quantize
from ptq.calibrate import BlockContext, capture_first_block_inputs
from ptq.models.mappings import Mapping, blocks_of
from ptq.nn import as_linears
from ptq.observers import build_observer
from ptq.spec import MAX_BITS, QuantSpec
from ptq.transforms.base import Quantizer, attach_activation_quantizers, layer_log, swap_to_fake_quant
from ptq.transforms.gptq import GPTQ
from ptq.transforms.rtn import RTN

QUANTIZERS: dict[str, Callable[..., Quantizer]] = {"rtn": RTN, "gptq": GPTQ}


class SecondMoment:
    """E[x_j²] per input channel over every token seen."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        batch = x.pow(2).sum(dim=0)
        self.total = batch if self.total is None else self.total + batch
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no activations were observed")
        return self.total / self.tokens


@torch.no_grad()
def input_second_moments(model: nn.Module, mapping: Mapping, samples: torch.Tensor, batch_size: int,
                         device: torch.device | str) -> dict[str, torch.Tensor]:
    """E[x_j²] of every Linear's input in every block, from one full-precision pass, one block on ``device`` at a
    time (the engine's capture and offload, without quantizing anything)."""
    device = torch.device(device)
    inputs, kwargs = capture_first_block_inputs(model, mapping, samples, batch_size, device)
    blocks = blocks_of(model, mapping)
    moments: dict[str, torch.Tensor] = {}
    for index in range(len(blocks)):
        block = as_linears(blocks[index]).to(device)
        ctx = BlockContext(block, index, f"{mapping.blocks}.{index}", mapping, inputs, kwargs, device)
        stats = {name: SecondMoment() for name in mapping.linear_names}
        ctx.stream({name: stat.update for name, stat in stats.items()})
        moments.update({ctx.qualified(name): stat.result().cpu() for name, stat in stats.items()})
        inputs = ctx.outputs()
        blocks[index] = block.to("cpu")
    return moments


def proxy_error(weight: torch.Tensor, second_moment: torch.Tensor, spec: QuantSpec, observer: str = "minmax",
                observer_options: dict[str, Any] | None = None) -> float:
    """Ω_b(W) = Σ_j E[x_j²] ‖W_:j − Q(W)_:j‖² with Q round-to-nearest on ``spec``'s grid."""
    weight = weight.float()
    scale, zero = build_observer(observer, spec, **(observer_options or {}))(weight)
    column_error = (weight - fake_quantize(weight, scale, zero, spec)).pow(2).sum(dim=0)
    return float((second_moment.to(column_error) * column_error).sum())


def allocate(params: dict[str, int], gain: dict[str, float], low_bits: int, high_bits: int,
             avg_bits: float) -> dict[str, int]:
    """Greedy 0/1 knapsack: the width of each layer such that Σ n_l b_l ≤ avg_bits · Σ n_l.

    Layers are raised from ``low_bits`` to ``high_bits`` in decreasing order of gain per extra bit; one that does
    not fit the remaining budget is skipped.
    """
    if not low_bits <= avg_bits:
        raise ValueError(f"avg_bits={avg_bits!r}: allowed is a number >= the low width {low_bits}")
    extra = high_bits - low_bits
    budget = (avg_bits - low_bits) * sum(params.values())  # extra bits left to spend
    bits = dict.fromkeys(params, low_bits)
    for name in sorted(params, key=lambda n: gain[n] / (params[n] * extra), reverse=True):
        cost = params[name] * extra
        if gain[name] > 0 and cost <= budget + 1e-6:
            bits[name] = high_bits
            budget -= cost
    return bits


def average_bits(params: dict[str, int], bits: dict[str, int]) -> float:
    """Σ n_l b_l / Σ n_l."""
    return sum(params[name] * bits[name] for name in params) / sum(params.values())


@dataclass
class MixedPrecision(Quantizer):
    """The ``mixed`` step. ``weight`` is the spec at the low width (``weight.bits``); ``high_bits`` the raised one.

    ``quantizer`` (rtn | gptq) rounds each layer at its width; ``quantizer_options`` are its own options (GPTQ's
    block_size, damp_percent, act_order, …).
    """

    high_bits: int = 8
    avg_bits: float = 4.5
    quantizer: str = "rtn"
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    name: str = "mixed"
    bits_of: dict[str, int] = field(default_factory=dict, init=False)  # layer → width, set by ``prepare``
    gain_of: dict[str, float] = field(default_factory=dict, init=False)  # layer → Ω_lo − Ω_hi

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer={self.quantizer!r}: allowed are {', '.join(QUANTIZERS)}")
        if not self.weight.bits < self.high_bits <= MAX_BITS:
            raise ValueError(f"high_bits={self.high_bits!r}: allowed is an integer in "
                             f"{self.weight.bits + 1}..{MAX_BITS} (above weight.bits)")
        if not self.weight.bits <= self.avg_bits <= self.high_bits:
            raise ValueError(f"avg_bits={self.avg_bits!r}: allowed is a number in "
                             f"[{self.weight.bits}, {self.high_bits}]")
        specs = {bits: replace(self.weight, bits=bits) for bits in (self.weight.bits, self.high_bits)}
        self._quantizers = {
            bits: QUANTIZERS[self.quantizer](weight=spec, observer=self.observer,
                                             observer_options=self.observer_options, **self.quantizer_options)
            for bits, spec in specs.items()
        }

    @property
    def needs_data(self) -> bool:
        return self._quantizers[self.weight.bits].needs_data or self.act_observer is not None

    @torch.no_grad()
    def prepare(self, model: nn.Module, mapping: Mapping, samples: torch.Tensor, batch_size: int,
                device: torch.device | str) -> None:
        """The pre-pass: E[x²] of every Linear, its proxy gain, and the allocation of widths."""
        moments = input_second_moments(model, mapping, samples, batch_size, device)
        blocks = blocks_of(model, mapping)
        params: dict[str, int] = {}
        for index, block in enumerate(blocks):
            for name in mapping.linear_names:
                qualified = f"{mapping.blocks}.{index}.{name}"
                weight = block.get_submodule(name).weight.data
                errors = [proxy_error(weight, moments[qualified], q.weight, self.observer, self.observer_options)
                          for q in self._quantizers.values()]
                self.gain_of[qualified] = errors[0] - errors[1]
                params[qualified] = weight.numel()
        self.bits_of = allocate(params, self.gain_of, self.weight.bits, self.high_bits, self.avg_bits)
        raised = sum(bits == self.high_bits for bits in self.bits_of.values())
        print(f"mixed precision: {raised}/{len(params)} linears at {self.high_bits} bits, the rest at "
              f"{self.weight.bits}; {average_bits(params, self.bits_of):.3f} average bits (budget {self.avg_bits})")

    def apply(self, ctx: BlockContext) -> None:
        if not self.bits_of:
            raise RuntimeError("mixed precision: call prepare(model, mapping, samples, …) before calibrating")
        stages = self._quantizers[self.weight.bits]
        for names in stages.linear_stages(ctx):
            stats = stages.observe(ctx, names)
            for name in names:
                qualified = ctx.qualified(name)
                quantizer = self._quantizers[self.bits_of[qualified]]
                linear = ctx.module(name)
                weight = linear.weight.data.float()
                result = quantizer.quantize_weight(qualified, weight, stats[name])
                swap_to_fake_quant(ctx.block, name, linear, quantizer.weight, result)
                ctx.logs[qualified] = {**layer_log(quantizer.weight, weight, result), "gain": self.gain_of[qualified]}
        if self.activations is not None:
            attach_activation_quantizers(ctx, self.activations, self.act_observer, self.act_observer_options)
