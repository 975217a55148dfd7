"""What a tensor becomes when quantized: bit width, symmetry and granularity.

Affine quantization maps a real x to an integer q = clamp(round(x / s) + z, qmin, qmax) and back to
s · (q − z) (Jacob et al. 2018, eq. 1). A ``QuantSpec`` fixes the integer range and which elements share one
(s, z) pair:

- ``tensor``: one pair for the whole tensor;
- ``channel``: one pair per row (a weight's output channel);
- ``token``: one pair per row of an activation (dynamic, computed at run time);
- ``group``: one pair per ``group_size`` consecutive input features of a row. When ``group_size`` does not
  divide the row, the last, shorter group gets its own pair.

``format`` is the grid the elements lie on: ``int`` (the affine integers above) or a small float with its scale
rule (FP8, MXFP8/MXFP4, NVFP4: ``ptq.formats``); float grids are symmetric (zero point 0) and fix ``bits``, and the
MX and NVFP4 formats fix the group size too.

``scale_dtype`` is the floating-point format the scales are stored in (float32, float16 or bfloat16). Scales are
rounded to it as soon as they are chosen (``ptq.affine.qparams_from_range``), before any algorithm uses them, so
the integers that RTN, GPTQ or AWQ decide are the ones an exported checkpoint holds, and its weights equal the
run's fake-quantized weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ptq.formats import FORMATS, GridFormat

Granularity = Literal["tensor", "channel", "group", "token"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group", "token")
MIN_BITS, MAX_BITS = 2, 8
SCALE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantSpec:
    """Bits, symmetry and granularity of one quantized tensor.

    Symmetric specs use absmax scaling with the zero point pinned at 0 and signed integers
    [−2^(b−1), 2^(b−1) − 1] (all 2^b levels: see ``ptq.affine.qparams_from_range``); asymmetric specs use
    min/max with an integer zero point and unsigned integers [0, 2^b − 1].
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = 128
    scale_dtype: str = "float32"
    format: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits={self.bits!r}: allowed are integers {MIN_BITS}..{MAX_BITS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}: allowed are {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r}: a group granularity needs a positive integer")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}: allowed are {', '.join(SCALE_DTYPES)}")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: allowed are {', '.join(FORMATS)}")
        self._check_format(FORMATS[self.format])

    def _check_format(self, grid: GridFormat) -> None:
        if grid.bits is not None and self.bits != grid.bits:
            raise ValueError(f"bits={self.bits!r}: format={self.format} has {grid.bits}-bit elements; "
                             f"allowed is bits={grid.bits}")
        if grid.is_float and not self.symmetric:
            raise ValueError(f"symmetric=False: format={self.format} is a sign-magnitude grid; allowed is "
                             "symmetric=true")
        if grid.group_size is not None and (self.granularity, self.group_size) != ("group", grid.group_size):
            layout = f"group_size={self.group_size}" if self.granularity == "group" else \
                f"granularity={self.granularity}"
            raise ValueError(f"{layout}: format={self.format} shares one scale per {grid.group_size} elements; "
                             f"allowed is granularity=group, group_size={grid.group_size}")

    @property
    def grid(self) -> GridFormat:
        """The element grid and scale rule of ``format`` (``ptq.formats``)."""
        return FORMATS[self.format]

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """The narrowest torch type that holds every code exactly: int8 (symmetric integers), uint8 (asymmetric
        integers), float8_e5m2 (E5M2 elements) or float8_e4m3fn (E4M3 elements, and E2M1's, a subset)."""
        elements = self.grid.elements
        if elements is None:
            return torch.int8 if self.symmetric else torch.uint8
        return torch.float8_e5m2 if elements.name == "e5m2" else torch.float8_e4m3fn

    def n_groups(self, features: int) -> int:
        """How many (scale, zero) pairs one row of ``features`` elements gets."""
        if self.granularity != "group":
            return 1
        return -(-features // self.group_size)

    def bits_per_weight(self, features: int, scale_bits: int = 16) -> float:
        """Average storage bits per element, counting one scale (and zero point if asymmetric) per group: of
        ``scale_bits``, or of the format's own scale width (8 for E8M0 and E4M3 block scales; NVFP4's per-tensor
        scale is not counted)."""
        if self.granularity == "tensor":
            return float(self.bits)
        overhead = (self.grid.scale_bits or scale_bits) + (0 if self.symmetric else self.bits)
        return self.bits + overhead * self.n_groups(features) / features


@dataclass(frozen=True)
class LinearScheme:
    """What a method turns a Linear into, known from the config alone (an export checks it before any model loads).

    ``act_order``: the input columns are not in group order (GPTQ's act-order without static groups), so a format
    needs a per-column group index (``g_idx``). ``outliers``: LLM.int8()'s full-precision outlier columns, found at
    run time. ``act_clip_ratio``: dynamic activation ranges clipped to that fraction of each token's [min, max].
    """

    weight: QuantSpec
    activations: QuantSpec | None = None
    static_activations: bool = False
    act_clip_ratio: float = 1.0
    act_order: bool = False
    outliers: bool = False

    def describe(self) -> str:
        """A short name, e.g. ``w4 g64 asymmetric · a8 token dynamic``."""
        w = self.weight
        layout = f"g{w.group_size}" if w.granularity == "group" else w.granularity
        text = f"w{w.bits} {layout} {'symmetric' if w.symmetric else 'asymmetric'}"
        text += "" if w.format == "int" else f" {w.format}"
        if self.act_order:
            text += " act-order"
        if self.activations is not None:
            a = self.activations
            text += f" · a{a.bits} {a.granularity} {'static' if self.static_activations else 'dynamic'}"
            text += "" if a.format == "int" else f" {a.format}"
            text += "" if self.act_clip_ratio == 1 else f" clip {self.act_clip_ratio:g}"
        return text + (" · fp16 outliers" if self.outliers else "")
