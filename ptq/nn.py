"""Quantized modules for research: a Linear with fake-quantized weights and (optionally) activations.

``FakeQuantLinear`` keeps the dequantized weight Ŵ = s · (q − z) in floating point, so it runs on any device
and any backend; it also keeps the integers the quantizer decided (``weight_int``) and their grid
(``weight_scale``, ``weight_zero``, ``weight_spec``, ``g_idx``), so that ``ptq.packed.convert`` can pack them for
the kernels and ``ptq.export`` can write them to a checkpoint without rounding anything again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ptq.affine import fake_quantize, minmax_qparams
from ptq.spec import QuantSpec

LINEAR_TYPES = (nn.Linear, Conv1D)
"""Modules that compute x Wᵀ + b: nn.Linear, and GPT-2's Conv1D (same map, weight stored [in, out])."""


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a Linear's input: per-token dynamic (qparams from each row) or static (fixed qparams).

    ``clip_ratio`` c < 1 clips dynamic ranges to c · [min, max] of each row (QuaRot §5: 0.9 for activations, 0.95
    for the KV cache); values beyond clamp to the grid's ends.
    """

    def __init__(self, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                 clip_ratio: float = 1.0) -> None:
        super().__init__()
        if not 0 < clip_ratio <= 1 or (scale is not None and clip_ratio != 1):
            raise ValueError(f"clip_ratio={clip_ratio!r}: allowed is a number in (0, 1] for dynamic ranges, "
                             "1 for static ones")
        self.clip_ratio = clip_ratio
        if spec.granularity not in ("token", "tensor", "group"):
            raise ValueError(f"activations.granularity={spec.granularity!r}: allowed are token, tensor, group")
        self.spec = spec
        self.dynamic = scale is None
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            scale, zero = minmax_qparams(x * self.clip_ratio if self.clip_ratio != 1 else x, self.spec)
        else:
            scale, zero = self.scale, self.zero
        return fake_quantize(x, scale, zero, self.spec)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        clip = f" clip={self.clip_ratio}" if self.clip_ratio != 1 else ""
        return f"int{self.spec.bits} {self.spec.granularity} {kind} symmetric={self.spec.symmetric}{clip}"


class FakeQuantLinear(nn.Module):
    """y = Q_a(x) Ŵᵀ + b with Ŵ the dequantized weight on the integer grid (weight_scale, weight_zero, g_idx).

    ``weight_int`` holds the integers q [out, in] in ``spec.code_dtype``; ``g_idx[j]`` is the group of input
    column j (not monotone after GPTQ's act-order without static groups).
    """

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                 zero: torch.Tensor, q: torch.Tensor, g_idx: torch.Tensor | None = None,
                 input_quantizer: ActivationQuantizer | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
        self.bias = linear.bias
        self.weight_spec = spec
        self.register_buffer("weight_int", q.to(spec.code_dtype))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero", zero)
        self.register_buffer("g_idx", g_idx)
        self.input_quantizer = input_quantizer
        if getattr(linear, "input_transform", None) is not None:
            set_input_transform(self, linear.input_transform)

    @property
    def input_spec(self) -> QuantSpec | None:
        return self.input_quantizer.spec if self.input_quantizer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        s = self.weight_spec
        group = f" g{s.group_size}" if s.granularity == "group" else f" {s.granularity}"
        return f"{self.in_features}, {self.out_features}, w{s.bits}{group} symmetric={s.symmetric}"


def set_input_transform(linear: nn.Module, transform: nn.Module) -> None:
    """Make ``linear`` compute f(transform(x)) for its input x, e.g. QuaRot's online Hadamard before down_proj.

    ``transform`` becomes the submodule ``input_transform``, run by a forward pre-hook placed before every other
    one, so that calibration hooks (GPTQ's Hessian, activation observers) and the input quantizer all see the
    transformed input; a ``FakeQuantLinear`` made from ``linear`` keeps it.
    """
    if getattr(linear, "input_transform", None) is not None:
        raise ValueError(f"{type(linear).__name__} already has an input transform")
    linear.input_transform = transform
    linear.register_forward_pre_hook(_transform_input, prepend=True)


def _transform_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_transform(args[0]), *args[1:])


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)



def as_linears(root: nn.Module) -> nn.Module:
    """Replace every Conv1D inside ``root`` by the nn.Linear that computes the same map (weight transposed).

    Every transform then sees [out, in] weights only. Returns ``root``.
    """
    for name, module in list(root.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.utils.skip_init(nn.Linear, module.nx, module.nf, device=module.weight.device,
                                        dtype=module.weight.dtype)
            linear.weight.data = module.weight.data.T.contiguous()
            linear.bias.data = module.bias.data
            set_submodule(root, name, linear)
    return root
