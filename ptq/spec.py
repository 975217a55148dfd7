"""What a tensor becomes when quantized: bit width, symmetry and granularity.

Affine quantization maps a real x to an integer q = clamp(round(x / s) + z, qmin, qmax) and back to
s · (q − z) (Jacob et al. 2018, eq. 1). A ``QuantSpec`` fixes the integer range and which elements share one
(s, z) pair:

- ``tensor``: one pair for the whole tensor;
- ``channel``: one pair per row (a weight's output channel);
- ``token``: one pair per row of an activation (dynamic, computed at run time);
- ``group``: one pair per ``group_size`` consecutive input features of a row. When ``group_size`` does not
  divide the row, the last, shorter group gets its own pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Granularity = Literal["tensor", "channel", "group", "token"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group", "token")
MIN_BITS, MAX_BITS = 2, 8


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

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits={self.bits!r}: allowed are integers {MIN_BITS}..{MAX_BITS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}: allowed are {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r}: a group granularity needs a positive integer")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def n_groups(self, features: int) -> int:
        """How many (scale, zero) pairs one row of ``features`` elements gets."""
        if self.granularity != "group":
            return 1
        return -(-features // self.group_size)

    def bits_per_weight(self, features: int, scale_bits: int = 16) -> float:
        """Average storage bits per element, counting one fp16 scale (and zero point if asymmetric) per group."""
        if self.granularity == "tensor":
            return float(self.bits)
        overhead = scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + overhead * self.n_groups(features) / features
