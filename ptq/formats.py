"""Number grids of quantized tensors: integers, and small floats with their scale formats (pure tensor math).

A ``QuantSpec.format`` names one ``GridFormat``: what each element may be and how the scale of a slot (one
(scale, zero) pair's elements, ``ptq.affine.slots``) is chosen and rounded.

- ``int``: the affine integer grid of ``ptq.affine`` (Jacob et al. 2018).
- ``fp8_e4m3`` / ``fp8_e5m2``: FP8 elements (Micikevicius et al. 2022, "FP8 Formats for Deep Learning", Table 1:
  E4M3 with bias 7, no infinities, max 448; E5M2 with bias 15, max 57344) under a float scale per tensor,
  channel, token or group, s = max|x| / max_element, stored in the spec's ``scale_dtype``.
- ``mxfp8`` / ``mxfp4``: OCP Microscaling Formats (MX) v1.0 (2023), §5: blocks of 32 elements (E4M3, or E2M1:
  ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) share one E8M0 scale X = 2^(⌊log2 max|x|⌋ − emax_elem) (§6.3, emax_elem = 8 for
  E4M3 and 2 for E2M1); elements are rounded to nearest, ties to even, and saturate at ±max_element.
- ``nvfp4``: E2M1 elements in blocks of 16, each block's scale stored in FP8 E4M3, under one FP32 scale per
  tensor (NVIDIA, "Introducing NVFP4 for Efficient and Accurate Low-Precision Inference", 2025): the tensor scale
  g = max|W| / (448 · 6) maps the largest block scale onto E4M3's range, and a block's scale is
  s = E4M3(max|x_block| / 6 / g) · g.

Every rounding here is the format's own (ties to even, saturation), applied before a scale or element is used, so
fake-quantization computes what a kernel or an exported checkpoint computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ElementFormat:
    """A sign-magnitude float with ``exponent_bits``, ``mantissa_bits``, exponent ``bias`` and largest finite
    value ``max_value`` (formats without infinities reach past the IEEE pattern: E4M3's 448)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_value: float

    @property
    def min_exponent(self) -> int:
        """The exponent of the smallest normal number (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """⌊log2 max_value⌋: OCP MX's emax_elem."""
        return int(torch.tensor(self.max_value).log2().floor())

    @cached_property
    def values(self) -> torch.Tensor:
        """Every non-negative finite value, ascending (float32)."""
        subnormal = [k * 2.0 ** (self.min_exponent - self.mantissa_bits) for k in range(2**self.mantissa_bits)]
        normal = [(1 + k / 2**self.mantissa_bits) * 2.0**e
                  for e in range(self.min_exponent, self.max_exponent + 1) for k in range(2**self.mantissa_bits)]
        return torch.tensor(sorted(v for v in {*subnormal, *normal} if v <= self.max_value))

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (float32) rounded to the nearest value of the format, ties to even, saturating at ±max_value.

        Within the binade [2^e, 2^(e+1)) the values are 2^(e − mantissa_bits) apart (below the smallest normal the
        spacing stays that of ``min_exponent``); x / spacing is exact, and torch.round rounds half to even.
        """
        magnitude = x.abs()
        _, exponent = torch.frexp(magnitude)  # magnitude = m · 2^exponent with m in [0.5, 1)
        binade = (exponent.float() - 1).clamp_min(self.min_exponent)
        spacing = torch.exp2(binade - self.mantissa_bits)
        rounded = (torch.round(magnitude / spacing) * spacing).clamp_max(self.max_value)
        return torch.copysign(rounded, x)


E2M1 = ElementFormat("e2m1", exponent_bits=2, mantissa_bits=1, bias=1, max_value=6.0)
E4M3 = ElementFormat("e4m3", exponent_bits=4, mantissa_bits=3, bias=7, max_value=448.0)
E5M2 = ElementFormat("e5m2", exponent_bits=5, mantissa_bits=2, bias=15, max_value=57344.0)
E8M0_EXPONENTS = (-127, 127)  # OCP MX v1.0 Table 3: 2^−127 … 2^127 (the all-ones pattern is NaN)
E4M3_SMALLEST = 2.0**-9  # E4M3's smallest subnormal: an all-zero block's scale stays positive


def e8m0_scale(absmax: torch.Tensor, elements: ElementFormat) -> torch.Tensor:
    """OCP MX v1.0 §6.3: the shared scale 2^(⌊log2 max|x|⌋ − emax_elem), clamped to E8M0's range."""
    _, exponent = torch.frexp(absmax.float())
    shared = (exponent.float() - 1 - elements.max_exponent).clamp(*E8M0_EXPONENTS)
    return torch.where(absmax > 0, torch.exp2(shared), torch.exp2(torch.tensor(float(E8M0_EXPONENTS[0]))))


def nvfp4_tensor_scale(tensor_absmax: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 per-tensor scale g = max|W| / (448 · 6) (1 for an all-zero tensor)."""
    g = tensor_absmax.float() / (E4M3.max_value * E2M1.max_value)
    return torch.where(g > 0, g, torch.ones_like(g))


def nvfp4_block_scale(absmax: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """A block's effective scale E4M3(max|x_block| / 6 / g) · g (the E4M3 value never below its smallest
    subnormal, so no block scale is 0)."""
    stored = E4M3.round(absmax.float() / E2M1.max_value / tensor_scale).clamp_min(E4M3_SMALLEST)
    return stored * tensor_scale


@dataclass(frozen=True)
class GridFormat:
    """What a ``QuantSpec.format`` fixes: the element grid (None: integers), the bits and group size it requires
    (None: any), how a slot's scale is rounded (``float``: to the spec's ``scale_dtype``; ``e8m0``; ``e4m3`` under
    a per-tensor FP32 scale) and the scale's storage bits per slot (None: the scale dtype's)."""

    name: str
    elements: ElementFormat | None = None
    bits: int | None = None
    group_size: int | None = None
    scale: str = "float"
    scale_bits: int | None = None

    @property
    def is_float(self) -> bool:
        return self.elements is not None

    @property
    def tensor_scale(self) -> bool:
        """Whether the slots' scales sit under one FP32 scale per tensor (NVFP4)."""
        return self.scale == "e4m3"


FORMATS: dict[str, GridFormat] = {
    "int": GridFormat("int"),
    "fp8_e4m3": GridFormat("fp8_e4m3", E4M3, bits=8),
    "fp8_e5m2": GridFormat("fp8_e5m2", E5M2, bits=8),
    "mxfp8": GridFormat("mxfp8", E4M3, bits=8, group_size=32, scale="e8m0", scale_bits=8),
    "mxfp4": GridFormat("mxfp4", E2M1, bits=4, group_size=32, scale="e8m0", scale_bits=8),
    "nvfp4": GridFormat("nvfp4", E2M1, bits=4, group_size=16, scale="e4m3", scale_bits=8),
}
