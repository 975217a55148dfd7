"""What every quantizer step shares: weight and activation specs, the observer, and the module swap.

Quantizers (RTN, GPTQ) decide the integers of each Linear in a block and replace it by a ``FakeQuantLinear``;
they differ only in ``quantize_weight``. Rescalers (SmoothQuant, AWQ) change weights without quantizing them and
implement ``Transform.apply`` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptq.calibrate import BlockContext
from ptq.nn import ActivationQuantizer, FakeQuantLinear, set_submodule
from ptq.observers import OBSERVERS, Observer, build_observer
from ptq.spec import LinearScheme, QuantSpec


@dataclass(frozen=True)
class QuantizedWeight:
    """The integer grid a quantizer chose for one weight, and what it cost."""

    weight: torch.Tensor  # dequantized, [out, in]: exactly dequantize(q, scale, zero) (gathered through g_idx)
    scale: torch.Tensor
    zero: torch.Tensor
    q: torch.Tensor  # the integers in [qmin, qmax], [out, in] (float32 or an integer dtype)
    g_idx: torch.Tensor | None = None
    loss: float | None = None  # the algorithm's own objective (e.g. GPTQ's Σ (w − q)² / [H⁻¹]ⱼⱼ)


def check_observer(name: str, options: dict[str, Any], key: str) -> None:
    """Fail early, naming ``key``, when an observer or one of its options is not allowed."""
    if name not in OBSERVERS:
        raise ValueError(f"{key}={name!r}: allowed are {', '.join(OBSERVERS)}")
    try:
        build_observer(name, QuantSpec(bits=8, granularity="tensor"), **options)
    except (TypeError, ValueError) as error:
        prefix = key.rpartition(".")[0]
        raise ValueError(f"{prefix}.{error}" if prefix else str(error)) from None


@dataclass
class Quantizer:
    """Base of weight quantizers: ``weight`` spec, weight ``observer``, optional ``activations`` spec.

    ``act_observer`` None means dynamic activation qparams (per token); a name calibrates static per-tensor
    qparams from the block's calibration inputs with that observer. ``act_clip_ratio`` c < 1 clips each token's
    dynamic range to c · [min, max] (QuaRot §5 uses 0.9 for int4 activations).
    """

    weight: QuantSpec
    observer: str = "minmax"
    observer_options: dict[str, Any] = field(default_factory=dict)
    activations: QuantSpec | None = None
    act_observer: str | None = None
    act_observer_options: dict[str, Any] = field(default_factory=dict)
    act_clip_ratio: float = 1.0
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        check_observer(self.observer, self.observer_options, "observer.name")
        if self.activations is not None:
            block = self.activations.grid.group_size is not None  # MX / NVFP4: dynamic per block of a token
            if self.act_observer is None and self.activations.granularity != ("group" if block else "token"):
                raise ValueError(
                    f"activations.granularity={self.activations.granularity!r}: dynamic activations are per token "
                    "(per block for MX and NVFP4 formats); set activations.observer for static per-tensor ranges"
                )
            if self.act_observer is not None:
                check_observer(self.act_observer, self.act_observer_options, "activations.observer")
            if not 0 < self.act_clip_ratio <= 1 or (self.act_observer is not None and self.act_clip_ratio != 1):
                raise ValueError(f"activations.clip_ratio={self.act_clip_ratio!r}: allowed is a number in (0, 1] "
                                 "for dynamic activations, 1 with activations.observer (static ranges)")

    @property
    def needs_data(self) -> bool:
        return self.act_observer is not None

    def schemes(self) -> list[LinearScheme]:
        """What this step makes of the Linears it quantizes (one scheme; mixed precision has one per width)."""
        return [LinearScheme(self.weight, self.activations, self.act_observer is not None, self.act_clip_ratio)]

    def quantize_weight(self, name: str, weight: torch.Tensor, inputs: Any) -> QuantizedWeight:
        raise NotImplementedError

    def linear_stages(self, ctx: BlockContext) -> list[list[str]]:
        """Groups of linears quantized together; later stages see the earlier ones already quantized."""
        return [ctx.mapping.linear_names]

    def observe(self, ctx: BlockContext, names: list[str]) -> dict[str, Any]:
        """Statistics of the linears' inputs the quantizer needs (none for RTN)."""
        return {name: None for name in names}

    def apply(self, ctx: BlockContext) -> None:
        for names in self.linear_stages(ctx):
            stats = self.observe(ctx, names)
            for name in names:
                linear = ctx.module(name)
                result = self.quantize_weight(ctx.qualified(name), linear.weight.data.float(), stats[name])
                swap_to_fake_quant(ctx.block, name, linear, self.weight, result)
                ctx.logs[ctx.qualified(name)] = layer_log(self.weight, linear.weight.data.float(), result)
        if self.activations is not None:
            self.attach_activation_quantizers(ctx)

    def input_quantizer(self, observer: Observer | None, device: torch.device) -> ActivationQuantizer:
        """A Linear's input quantizer: dynamic (clipped by ``act_clip_ratio``), or static from a calibrated
        ``observer``."""
        if observer is None:
            return ActivationQuantizer(self.activations, clip_ratio=self.act_clip_ratio)
        return static_input_quantizer(self.activations, observer, device)

    def attach_activation_quantizers(self, ctx: BlockContext) -> None:
        """Give every quantized Linear of the block its input quantizer (static ones observe the block's inputs)."""
        names = ctx.mapping.linear_names
        observers: dict[str, Observer | None] = dict.fromkeys(names)
        if self.act_observer is not None:
            observers = {name: build_observer(self.act_observer, self.activations, **self.act_observer_options)
                         for name in names}
            ctx.stream({name: obs.update for name, obs in observers.items()})
        for name, obs in observers.items():
            ctx.module(name).input_quantizer = self.input_quantizer(obs, ctx.device)


def static_input_quantizer(spec: QuantSpec, obs: Observer, device: torch.device) -> ActivationQuantizer:
    """An input quantizer with the fixed qparams a calibrated observer chose (from every rank's tokens)."""
    scale, zero = obs.all_reduce().qparams()
    return ActivationQuantizer(spec, scale.to(device), zero.to(device))


def layer_log(spec: QuantSpec, weight: torch.Tensor, result: QuantizedWeight) -> dict[str, Any]:
    """Per-layer record: bits, group size, weight MSE and SQNR (dB), the algorithm's loss."""
    error = (result.weight.float() - weight).pow(2).mean().item()
    signal = weight.pow(2).mean().item()
    return {
        "bits": spec.bits,
        "group_size": spec.group_size if spec.granularity == "group" else spec.granularity,
        "weight_mse": error,
        "weight_sqnr_db": 10 * math.log10(signal / error) if error > 0 else math.inf,
        "loss": result.loss,
    }


def swap_to_fake_quant(block: nn.Module, name: str, linear: nn.Linear, spec: QuantSpec,
                       result: QuantizedWeight) -> None:
    set_submodule(block, name, FakeQuantLinear(linear, result.weight, spec, result.scale, result.zero, result.q,
                                               result.g_idx))
