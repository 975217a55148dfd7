"""LLM.int8(): vector-wise int8 matrix multiplication with a full-precision decomposition of outlier features.

Dettmers, Lewis, Belkada, Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
§3. Transformers beyond a few billion parameters have a handful of hidden dimensions whose activations are ~20×
larger than the rest; quantizing them with the other dimensions of a token crushes the rest to zero. The paper
keeps the int8 product for almost every dimension and multiplies the few outlier dimensions in 16 bits:

- §3.1, vector-wise quantization: each row of X (a token) and each output channel of W get their own absmax
  scale, so X Wᵀ ≈ diag(c_x) · (X_i8 W_i8ᵀ) · diag(c_w) / 127² (eq. 5);
- §3.2, mixed-precision decomposition (eq. 6): the input columns O = {j : |X_tj| > α for some token t of the
  batch} (α = ``threshold``, 6.0 in the paper) go through the fp path,

      Y = X_O W_Oᵀ  +  dequant(Q(X_R) Q(W)_Rᵀ),      R = all columns not in O,

  with O detected anew on every forward pass, over the batch's hidden states.

Here W is quantized once per output channel over all its columns (the int8 weight a deployment stores); Q(X_R) is
the per-token quantization of X with the outlier columns zeroed, as bitsandbytes computes it; X_O W_Oᵀ uses the
full-precision weight columns, as the paper writes it. Table 1 reports LLM.int8() with either grid of §2.1:
absmax (symmetric, what bitsandbytes ships: ``method=llm_int8_absmax``) and zeropoint (asymmetric, as accurate
or more at every size, the most at 125M: ``method=llm_int8``), chosen by the specs' ``symmetric``. With no
outliers the layer is exactly W8A8 with int8 per-channel weights and dynamic int8 per-token activations of the
same grid (``method=rtn_w8a8`` for absmax).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ptq.affine import quantize_dynamic
from ptq.calibrate import BlockContext
from ptq.nn import set_submodule
from ptq.spec import LinearScheme, QuantSpec
from ptq.transforms.base import layer_log
from ptq.transforms.rtn import RTN


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The feature dimensions O (bool [features]) where any element of ``x`` [..., features] has |x| > threshold."""
    return (x.abs() > threshold).reshape(-1, x.shape[-1]).any(dim=0)


def grid_name(spec: QuantSpec) -> str:
    """The paper's name (§2.1) for a spec's grid: absmax (symmetric) or zeropoint (asymmetric)."""
    return "absmax" if spec.symmetric else "zeropoint"


def int8_decomposed_matmul(x: torch.Tensor, weight_q: torch.Tensor, weight_fp: torch.Tensor,
                           bias: torch.Tensor | None, act_spec: QuantSpec, threshold: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: X_O W_Oᵀ (full precision) + Q(X_R) Ŵᵀ (fake-quantized), and the outlier mask O.

    ``weight_q`` is the dequantized int8 weight Ŵ [out, in]; ``weight_fp`` the full-precision one, read only in the
    outlier columns.
    """
    outliers = outlier_columns(x, threshold)
    regular = x.masked_fill(outliers, 0.0)
    y = F.linear(quantize_dynamic(regular, act_spec), weight_q, bias)
    if outliers.any():
        columns = outliers.nonzero().squeeze(1)
        y = y + F.linear(x.index_select(-1, columns), weight_fp.index_select(1, columns))
    return y, outliers


class LLMInt8Linear(nn.Module):
    """A Linear computing eq. 6 on every call.

    ``weight`` is the dequantized int8 weight and ``weight_spec`` its spec (what the model stores, as for
    ``FakeQuantLinear``); ``weight_fp`` holds the full-precision weight for the outlier columns. There is no
    ``weight_scale``/``weight_zero``, so ``ptq.packed.convert`` leaves the layer alone: a packed kernel would drop
    the decomposition. ``outlier_hits[j]`` counts the calls in which input column j was an outlier (§4's count of
    outlier dimensions).
    """

    def __init__(self, linear: nn.Linear, weight_q: torch.Tensor, weight_spec: QuantSpec, act_spec: QuantSpec,
                 threshold: float) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype
        self.weight = nn.Parameter(weight_q.to(dtype), requires_grad=False)
        self.register_buffer("weight_fp", linear.weight.data.clone())
        self.bias = linear.bias
        self.weight_spec, self.input_spec, self.threshold = weight_spec, act_spec, threshold
        self.register_buffer("outlier_hits", torch.zeros(self.in_features, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, outliers = int8_decomposed_matmul(x, self.weight, self.weight_fp, self.bias, self.input_spec,
                                             self.threshold)
        self.outlier_hits += outliers
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, w{self.weight_spec.bits} {self.weight_spec.granularity} "
                f"{grid_name(self.weight_spec)}, a{self.input_spec.bits} token {grid_name(self.input_spec)}, "
                f"outliers |x| > {self.threshold}")


@dataclass
class LLMInt8(RTN):
    """The ``llm_int8`` step: round each Linear's weight to its int8 grid (as RTN) and swap in ``LLMInt8Linear``.

    Nothing is calibrated: the outlier dimensions are found at run time, so the step needs no data.
    """

    threshold: float = 6.0
    name: str = "llm_int8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold > 0:
            raise ValueError(f"threshold={self.threshold!r}: allowed is a number > 0")
        if self.activations is None or self.activations.granularity != "token" or self.act_observer is not None:
            raise ValueError(
                "activations: LLM.int8() quantizes activations per token at run time (§3.1); allowed is "
                "{bits: 8, symmetric: true|false, granularity: token} without an observer"
            )

    def schemes(self) -> list[LinearScheme]:
        return [replace(scheme, outliers=True) for scheme in super().schemes()]

    def apply(self, ctx: BlockContext) -> None:
        for name in ctx.mapping.linear_names:
            linear = ctx.module(name)
            weight = linear.weight.data.float()
            result = self.quantize_weight(ctx.qualified(name), weight, None)
            set_submodule(ctx.block, name,
                          LLMInt8Linear(linear, result.weight, self.weight, self.activations, self.threshold))
            ctx.logs[ctx.qualified(name)] = layer_log(self.weight, weight, result)
