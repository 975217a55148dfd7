"""Round-to-nearest (RTN): each weight goes to the nearest point of a grid chosen by an observer.

The baseline of every PTQ paper (e.g. GPTQ Tables 2–4, AWQ Table 4): Ŵ = s · (clamp(round(W / s) + z) − z) with
(s, z) from min/max — or from any observer (``mse`` searches the clip ratio, like AWQ's clip search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ptq.affine import dequantize, quantize
from ptq.observers import build_observer
from ptq.transforms.base import QuantizedWeight, Quantizer


@dataclass
class RTN(Quantizer):
    name: str = "rtn"

    def quantize_weight(self, name: str, weight: torch.Tensor, inputs: Any) -> QuantizedWeight:
        scale, zero = build_observer(self.observer, self.weight, **self.observer_options)(weight)
        q = quantize(weight, scale, zero, self.weight)
        return QuantizedWeight(dequantize(q, scale, zero, self.weight), scale, zero, q)
