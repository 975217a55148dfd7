"""Mixed-precision weights: the most sensitive Linears get more bits, under an average bit budget.

Sensitivity is the layer's output error under a diagonal Hessian (the "diagonal-Hessian" proxy of HAWQ, Dong et
al. 2019, in the form of the layer-wise objective of OBQ / GPTQ, Frantar et al. 2022, eq. 1, with H = E[x xᵀ]
replaced by its diagonal):

    E‖(W − Q_b(W)) x‖²  ≈  Ω_b(W) = Σ_j E[x_j²] · ‖W_:j − Q_b(W)_:j‖²

from one full-precision pass over the calibration data. ``sensitivity`` (``SENSITIVITIES``) decides how layers are
compared: ``output`` takes Ω_b as it is; ``relative`` divides it by the layer's output energy under the same
diagonal approximation, S = Σ_j E[x_j²] ‖W_:j‖², i.e. the inverse of the layer's output SQNR. Activations grow
with depth in a pre-norm transformer while every block writes into a residual stream that grows with them, so the
absolute error over-weights late layers; on SmolLM2-135M at 4 average bits (widths 3–8, groups of 64, RTN; 16
calibration and 16 evaluation windows of pydoc) ``output`` gave perplexity 21.1, ``relative`` 15.3, uniform 4 bits
16.4.

Each Linear l with n_l weights gets a width b_l between the low width ``weight.bits`` and ``high_bits`` (every
integer in between is a candidate), under a budget on the parameter-weighted mean of the nominal widths (scales not
counted):

    minimise Σ_l σ_l(b_l)   subject to   Σ_l n_l b_l ≤ avg_bits · Σ_l n_l,    σ_l(b) = Ω_b(W_l) or Ω_b(W_l) / S_l.

Allocation is greedy, as for the multiple-choice knapsack (Sinha & Zoltners 1979): every layer starts at the low
width; each round raises the one layer, and to the one width, with the largest error reduction per extra stored
bit, (σ(b) − σ(b')) / (n_l (b' − b)), among the raises the remaining budget allows; it stops when none is left.
Error falls roughly 4× per bit, so an allocation that may only choose the two end widths rarely beats uniform bits at
the same average: the intermediate widths are what make the trade worth it. Each Linear is then quantized by RTN or
GPTQ at its width.

The engine sees one block at a time, but the allocation is global: ``prepare`` (called by the pipeline before
calibration) runs the pre-pass over all blocks and fixes every layer's width; ``apply`` quantizes block by block.
Rescalers placed before this step change the weights after the allocation was made; their effect is not seen
by the proxy.
"""

from __future__ import annotations

from collections import Counter
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
from ptq.spec import MAX_BITS, LinearScheme, QuantSpec
from ptq.transforms.base import Quantizer, layer_log, swap_to_fake_quant
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


def output_sensitivity(error: float, signal: float) -> float:
    """Ω_b: the layer's output error itself."""
    return error


def relative_sensitivity(error: float, signal: float) -> float:
    """Ω_b / S: the layer's output noise-to-signal ratio (1 / SQNR), comparable across depths."""
    return error / signal if signal > 0 else 0.0


SENSITIVITIES: dict[str, Callable[[float, float], float]] = {
    "output": output_sensitivity,
    "relative": relative_sensitivity,
}


def allocate(params: dict[str, int], errors: dict[str, dict[int, float]], avg_bits: float) -> dict[str, int]:
    """Greedy widths b_l ∈ errors[l] (each layer's sensitivity per candidate width) with Σ n_l b_l ≤ avg_bits · Σ n_l.

    All layers start at their lowest width; each round applies the affordable raise with the largest error
    reduction per extra bit, until no raise both fits and reduces the error.
    """
    bits = {name: min(errors[name]) for name in params}
    budget = avg_bits * sum(params.values()) - sum(params[name] * bits[name] for name in params)
    if budget < -1e-6:
        raise ValueError(f"avg_bits={avg_bits!r}: allowed is a number >= the lowest width")
    while True:
        best, best_rate = None, 0.0
        for name, n in params.items():
            now = bits[name]
            for width, error in errors[name].items():
                cost = n * (width - now)
                if width > now and cost <= budget + 1e-6 and (errors[name][now] - error) / cost > best_rate:
                    best, best_rate = (name, width), (errors[name][now] - error) / cost
        if best is None:
            return bits
        name, width = best
        budget -= params[name] * (width - bits[name])
        bits[name] = width


def average_bits(params: dict[str, int], bits: dict[str, int]) -> float:
    """Σ n_l b_l / Σ n_l."""
    return sum(params[name] * bits[name] for name in params) / sum(params.values())


@dataclass
class MixedPrecision(Quantizer):
    """The ``mixed`` step. ``weight`` is the spec at the low width (``weight.bits``); ``high_bits`` the highest.

    ``sensitivity`` (output | relative) compares the layers; ``quantizer`` (rtn | gptq) rounds each layer at its
    width; ``quantizer_options`` are its own options (GPTQ's block_size, damp_percent, act_order, …).
    """

    high_bits: int = 8
    avg_bits: float = 4.5
    sensitivity: str = "relative"
    quantizer: str = "rtn"
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    name: str = "mixed"
    bits_of: dict[str, int] = field(default_factory=dict, init=False)  # layer → width, set by ``prepare``
    errors_of: dict[str, dict[int, float]] = field(default_factory=dict, init=False)  # layer → {width: σ}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity={self.sensitivity!r}: allowed are {', '.join(SENSITIVITIES)}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer={self.quantizer!r}: allowed are {', '.join(QUANTIZERS)}")
        if not self.weight.bits < self.high_bits <= MAX_BITS:
            raise ValueError(f"high_bits={self.high_bits!r}: allowed is an integer in "
                             f"{self.weight.bits + 1}..{MAX_BITS} (above weight.bits)")
        if not self.weight.bits <= self.avg_bits <= self.high_bits:
            raise ValueError(f"avg_bits={self.avg_bits!r}: allowed is a number in "
                             f"[{self.weight.bits}, {self.high_bits}]")
        specs = {bits: replace(self.weight, bits=bits) for bits in range(self.weight.bits, self.high_bits + 1)}
        self._quantizers = {
            bits: QUANTIZERS[self.quantizer](weight=spec, observer=self.observer,
                                             observer_options=self.observer_options, **self.quantizer_options)
            for bits, spec in specs.items()
        }

    @property
    def needs_data(self) -> bool:
        return self._quantizers[self.weight.bits].needs_data or self.act_observer is not None

    def schemes(self) -> list[LinearScheme]:
        """One scheme per width a Linear may get (``weight.bits`` … ``high_bits``)."""
        own = super().schemes()[0]
        return [replace(scheme, activations=own.activations, static_activations=own.static_activations)
                for quantizer in self._quantizers.values() for scheme in quantizer.schemes()]

    @torch.no_grad()
    def prepare(self, model: nn.Module, mapping: Mapping, samples: torch.Tensor, batch_size: int,
                device: torch.device | str) -> None:
        """The pre-pass: E[x²] of every Linear, its sensitivity at every width, and the allocation of widths."""
        moments = input_second_moments(model, mapping, samples, batch_size, device)
        blocks = blocks_of(model, mapping)
        sensitivity = SENSITIVITIES[self.sensitivity]
        params: dict[str, int] = {}
        for index, block in enumerate(blocks):
            for name in mapping.linear_names:
                qualified = f"{mapping.blocks}.{index}.{name}"
                weight, moment = block.get_submodule(name).weight.data, moments[qualified]
                signal = float((moment * weight.float().pow(2).sum(dim=0)).sum())
                self.errors_of[qualified] = {
                    bits: sensitivity(proxy_error(weight, moment, q.weight, self.observer, self.observer_options),
                                      signal)
                    for bits, q in self._quantizers.items()}
                params[qualified] = weight.numel()
        self.bits_of = allocate(params, self.errors_of, self.avg_bits)
        counts = Counter(self.bits_of.values())
        layers = ", ".join(f"{counts[bits]} at {bits}" for bits in sorted(counts))
        print(f"mixed precision: linears {layers} bits; {average_bits(params, self.bits_of):.3f} average bits "
              f"(budget {self.avg_bits})")

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
                sensitivity = self.errors_of[qualified][quantizer.weight.bits]
                ctx.logs[qualified] = {**layer_log(quantizer.weight, weight, result), "sensitivity": sensitivity}
        if self.activations is not None:
            self.attach_activation_quantizers(ctx)
