"""Packed-integer Linear layers and the swap from calibrated fake-quant Linears to them.

A ``QuantLinear`` stores what a quantized layer really needs in memory (Frantar et al. 2023, GPTQ §5; Lin et al.
2024, AWQ §4; Xiao et al. 2023, SmoothQuant §3): the integers, packed, plus one scale (and zero point) per group.
Three storage modes, chosen from the weight and activation specs:

- ``w4``: weight bits ≤ 4, weight-only. int4 nibbles packed 8 per int32 along K (``qweight`` [⌈K/8⌉, N]),
  ``scales`` [G, N], ``zeros`` uint8 [G, N] if asymmetric. 2- and 3-bit weights are stored as nibbles too.
- ``w8``: weight bits 5..8, weight-only. ``qweight`` int8 [N, K], ``scales`` [G, N], ``zeros`` int8 if asymmetric.
- ``w8a8``: 8-bit symmetric per-token activations with a symmetric per-channel (or per-tensor) weight of any
  width: ``qweight`` int8 [N, K], ``weight_scale`` fp32 [N], run as an int8 × int8 GEMM.

Any other activation spec, and static activation qparams, are emulated: x is fake-quantized before the
weight-only path. See docs/kernels.md for layouts and dispatch.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.affine import fake_quantize, quantize, quantize_dynamic
from ptq.kernels import reference
from ptq.kernels.dispatch import check_backend, kernel, triton_runs_on
from ptq.spec import QuantSpec

WEIGHT_ATTRS = ("weight_scale", "weight_zero", "weight_spec")
"""The contract of a calibrated module that ``convert`` packs (plus an optional ``input_spec``)."""


def storage_mode(weight_spec: QuantSpec, input_spec: QuantSpec | None) -> str:
    """"w8a8" when the integer GEMM applies, else "w4" (bits ≤ 4) or "w8" (bits 5..8) weight-only."""
    int8_tokens = input_spec is not None and input_spec.bits == 8 and input_spec.symmetric
    int8_tokens = int8_tokens and input_spec.granularity == "token"
    if int8_tokens and weight_spec.symmetric and weight_spec.granularity in ("channel", "tensor"):
        return "w8a8"
    return "w4" if weight_spec.bits <= 4 else "w8"


def effective_group_size(spec: QuantSpec, in_features: int) -> int:
    """Input features per scale: the group size, or K when one scale covers the whole row."""
    if spec.granularity != "group" or spec.n_groups(in_features) == 1:
        return in_features
    return spec.group_size


def act_order_permutation(g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor | None:
    """The column order that makes ``g_idx`` the affine layout (column j in group j // group_size), or None when
    it already is. Raises if no order does (groups of unequal size)."""
    if g_idx is None:
        return None
    k = g_idx.numel()
    layout = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx.long(), layout):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm].long(), layout):
        raise ValueError("g_idx does not split the input columns into groups of group_size: cannot pack")
    return perm


class QuantLinear(nn.Module):
    """A Linear layer on packed integer weights; ``forward`` dispatches to ``backend`` ("torch" or "triton")."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_spec: QuantSpec,
        input_spec: QuantSpec | None = None,
        bias: bool = False,
        backend: str = "torch",
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        act_order: bool = False,
        static_input: bool = False,
    ) -> None:
        super().__init__()
        check_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.input_spec, self.backend = weight_spec, input_spec, backend
        self.mode = storage_mode(weight_spec, None if static_input else input_spec)
        self.group_size = effective_group_size(weight_spec, in_features)
        groups = -(-in_features // self.group_size)
        asym = not weight_spec.symmetric
        n, k = out_features, in_features
        if self.mode == "w4":
            self.register_buffer("qweight", torch.zeros(-(-k // 8), n, dtype=torch.int32, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
        if self.mode == "w8a8":
            self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))
        else:
            self.register_buffer("scales", torch.ones(groups, n, dtype=dtype, device=device))
            zero_dtype = torch.uint8 if self.mode == "w4" else torch.int8
            self.register_buffer("zeros", torch.zeros(groups, n, dtype=zero_dtype, device=device) if asym else None)
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)
        perm = torch.arange(k, device=device) if act_order else None
        self.register_buffer("perm", perm)  # input columns in group order (GPTQ act-order), or None
        self.register_buffer("input_scale", None)  # static activation qparams (set by from_float), or None
        self.register_buffer("input_zero", None)

    @classmethod
    @torch.no_grad()
    def from_float(
        cls,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: QuantSpec,
        bias: torch.Tensor | None = None,
        backend: str = "torch",
        input_spec: QuantSpec | None = None,
        dtype: torch.dtype | None = None,
        g_idx: torch.Tensor | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        """Pack ``weight`` [N, K] under slot-shaped ``scale``/``zero`` (affine convention) and ``spec``.

        The integers are round(weight / scale) + zero, clamped: exact when ``weight`` is already the dequantized
        weight. ``dtype`` (scales and bias) defaults to the weight's dtype. ``g_idx[j]``, the group of input
        column j, may be a permutation of the affine layout (GPTQ act-order with dynamic groups): the columns are
        then stored in group order and ``forward`` gathers x's features the same way. ``input_qparams``: static
        (scale, zero) of the activations under ``input_spec`` (emulated); None for dynamic ones.
        """
        n, k = weight.shape
        dtype = dtype or weight.dtype
        perm = act_order_permutation(g_idx, effective_group_size(spec, k))
        layer = cls(k, n, spec, input_spec, bias is not None, backend, dtype, weight.device, perm is not None,
                    static_input=input_qparams is not None)
        if input_qparams is not None:
            layer.input_scale, layer.input_zero = (p.detach().to(weight.device) for p in input_qparams)
        if perm is not None:
            weight = weight[:, perm]
            layer.perm.copy_(perm)
        q = quantize(weight, scale, zero, spec)
        scale = scale.float().reshape(-1, scale.shape[-1]).expand(n, -1)
        if layer.mode == "w8a8":
            layer.qweight.copy_(reference.pack_int8_weight(q, symmetric=True))
            layer.weight_scale.copy_(scale.reshape(n))
        else:
            pack = reference.pack_int4_weight if layer.mode == "w4" else reference.pack_int8_weight
            layer.qweight.copy_(pack(q, spec.symmetric))
            layer.scales.copy_(scale.t())
            if layer.zeros is not None:
                zero = zero.float().reshape(-1, zero.shape[-1]).expand(n, -1)
                layer.zeros.copy_(reference.pack_zeros(zero, 4 if layer.mode == "w4" else 8))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" and not triton_runs_on(x):
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch'")
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.mode == "w8a8":
            return kernel("w8a8", self.backend)(x, self.qweight, self.weight_scale, self.bias)
        if self.input_scale is not None:
            x = fake_quantize(x, self.input_scale, self.input_zero, self.input_spec)
        elif self.input_spec is not None:
            x = quantize_dynamic(x, self.input_spec)
        return kernel("weight_only", self.backend)(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def parameter_bytes(self) -> int:
        """Bytes of every stored tensor: packed integers, scales, zero points, bias."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        act = f", act={self.input_spec.bits}-bit {self.input_spec.granularity}" if self.input_spec else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"bits={self.weight_spec.bits}, group_size={self.group_size}{act}, backend={self.backend}")


def is_calibrated_linear(module: nn.Module) -> bool:
    """Whether ``module`` carries the calibration contract: weight_scale, weight_zero and a QuantSpec weight_spec."""
    return all(hasattr(module, a) for a in WEIGHT_ATTRS) and isinstance(module.weight_spec, QuantSpec)


def static_input_qparams(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, zero) of a static activation quantizer (``module.input_quantizer`` with ``dynamic`` False)."""
    quantizer = getattr(module, "input_quantizer", None)
    if quantizer is None or getattr(quantizer, "dynamic", True):
        return None
    return quantizer.scale, quantizer.zero


def convert(model: nn.Module, backend: str = "torch") -> nn.Module:
    """Replace every calibrated (fake-quant) Linear in ``model`` by a ``QuantLinear``; returns the model.

    A module qualifies when it has ``weight_scale``, ``weight_zero`` and ``weight_spec`` (see
    ``is_calibrated_linear``); its ``.weight`` is the dequantized float weight, ``input_spec`` (optional, None
    for weight-only) the activation spec, ``g_idx`` (optional) the group of each input column. Activations
    are dynamic unless ``input_quantizer`` is static (``dynamic`` False, with ``scale`` and ``zero``): those
    are kept and emulated. If ``model`` itself qualifies, its replacement is returned.
    """
    check_backend(backend)
    targets = [(name, m) for name, m in model.named_modules() if is_calibrated_linear(m)]
    for name, module in targets:
        bias = getattr(module, "bias", None)
        packed = QuantLinear.from_float(
            module.weight.detach(), module.weight_scale, module.weight_zero, module.weight_spec,
            bias=None if bias is None else bias.detach(), backend=backend,
            input_spec=getattr(module, "input_spec", None), g_idx=getattr(module, "g_idx", None),
            input_qparams=static_input_qparams(module),
        )
        if not name:
            return packed
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, packed)
    return model
