"""Affine quantization as pure tensor math (no modules, no state).

q = clamp(round(x / s) + z, qmin, qmax),  x̂ = s · (q − z)     (Jacob et al. 2018, eq. 1)

Quantization parameters have the "slot" shape of a spec: the tensor's shape with its last dimension replaced
by the number of (s, z) pairs along it (``tensor``: all ones; ``channel``/``token``: last dim 1; ``group``:
last dim ⌈features / group_size⌉). ``slots`` exposes the elements that share one pair as the last dimension, so
every observer is one reduction over ``dim=-1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptq.formats import e8m0_scale, nvfp4_block_scale, nvfp4_tensor_scale
from ptq.spec import QuantSpec

EPS = 1e-8
SCALE_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def slots(x: torch.Tensor, spec: QuantSpec, pad: float | None = None) -> torch.Tensor:
    """View ``x`` as [..., n_slots, slot_len]: the elements sharing one (s, z) pair lie along the last dim.

    A ragged last group is padded to full length, by repeating its last element (which leaves min, max and
    the percentiles' support unchanged) or with ``pad`` when given (use 0 for masks).
    """
    if spec.granularity == "tensor":
        return x.reshape(*([1] * (x.dim() - 1)), 1, -1)
    if spec.granularity in ("channel", "token"):
        return x.unsqueeze(-2)
    features, size = x.shape[-1], spec.group_size
    missing = spec.n_groups(features) * size - features
    if missing:
        if pad is None:
            filler = x[..., -1:].expand(*x.shape[:-1], missing)
        else:
            filler = x.new_full((*x.shape[:-1], missing), pad)
        x = torch.cat([x, filler], dim=-1)
    return x.reshape(*x.shape[:-1], -1, size)


def expand(param: torch.Tensor, spec: QuantSpec, features: int) -> torch.Tensor:
    """Broadcast slot-shaped ``param`` back to elements (a ragged last group is cut to length)."""
    if spec.granularity != "group":
        return param
    return param.repeat_interleave(spec.group_size, dim=-1)[..., :features]


def round_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``scale`` rounded to the nearest value of ``spec.scale_dtype``, as float32.

    Scales outside the format's normal range are clamped into it (float16 would otherwise flush a tiny scale to 0
    or overflow a huge one). A float64 scale (GPTQ with a float64 Hessian) is rounded to float32, which every
    checkpoint stores at most.
    """
    dtype = SCALE_TORCH_DTYPES[spec.scale_dtype]
    if dtype == torch.float32:
        return scale.float()
    info = torch.finfo(dtype)
    return scale.clamp(info.tiny, info.max).to(dtype).float()


def float_grid_scale(absmax: torch.Tensor, spec: QuantSpec, tensor_absmax: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The scale of each slot on a float grid (``ptq.formats``): max|x| / max_element rounded to ``scale_dtype``,
    OCP MX's E8M0 shared scale, or NVFP4's E4M3 block scale under the FP32 tensor scale of ``tensor_absmax``
    (default: the largest of ``absmax``, right when ``absmax`` covers the whole tensor)."""
    grid = spec.grid
    if grid.scale == "e8m0":
        return e8m0_scale(absmax, grid.elements)
    if grid.scale == "e4m3":
        return nvfp4_block_scale(absmax, nvfp4_tensor_scale(absmax.amax() if tensor_absmax is None else tensor_absmax))
    return round_scale(absmax.clamp_min(EPS) / grid.elements.max_value, spec)


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec,
                       tensor_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [xmin, xmax] onto the spec's grid.

    The range is widened to include 0, so that 0 is exactly representable (padding, ReLU zeros).
    Asymmetric: s = (max − min) / (qmax − qmin), z = qmin − round(min / s).
    Symmetric: s = max|x| / ((qmax − qmin) / 2), z = 0 — the grid spans all 2^b integers, so +max|x| lands half a
    step past qmax and is clipped by at most s/2 (the convention of the GPTQ reference and llm-compressor; on
    SmolLM2's weights it lowers the W3 g64 rounding error by 23% against the textbook s = max|x| / qmax).
    The scale is rounded to ``spec.scale_dtype`` (``round_scale``) before the zero point is derived from it.
    Float grids: ``float_grid_scale`` (``tensor_absmax`` is NVFP4's per-tensor range), z = 0.
    """
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    if spec.grid.is_float:
        scale = float_grid_scale(torch.maximum(xmax, -xmin), spec, tensor_absmax)
        return scale, torch.zeros_like(scale)
    if spec.symmetric:
        scale = round_scale(torch.maximum(xmax, -xmin).clamp_min(EPS) / ((spec.qmax - spec.qmin) / 2), spec)
        return scale, torch.zeros_like(scale)
    scale = round_scale((xmax - xmin).clamp_min(EPS) / (spec.qmax - spec.qmin), spec)
    zero = (spec.qmin - torch.round(xmin / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero


def round_to_grid(scaled: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The code of ``scaled`` = x / s: clamp(round(x / s) + z, qmin, qmax) for integers (ties to even), the
    nearest element of a float grid (ties to even, saturating; z is 0) otherwise. float32 in, float32 out."""
    elements = spec.grid.elements
    if elements is None:
        return torch.clamp(torch.round(scaled) + zero, spec.qmin, spec.qmax)
    return elements.round(scaled)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (as float32: integers, exact for ≤ 8 bits, or float-grid elements) for ``x`` under slot-shaped
    ``scale`` and ``zero``."""
    features = x.shape[-1]
    s, z = expand(scale, spec, features), expand(zero, spec, features)
    return round_to_grid(x.float() / s, z, spec)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Real values s · (q − z) of codes ``q``."""
    features = q.shape[-1]
    return expand(scale, spec, features) * (q.float() - expand(zero, spec, features))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(x)) in ``x``'s dtype: the value a quantized tensor stands for."""
    return dequantize(quantize(x, scale, zero, spec), scale, zero, spec).to(x.dtype)


def minmax_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from the min and max of each slot of ``x`` (dynamic, e.g. per token)."""
    view = slots(x, spec)
    return qparams_from_range(view.amin(dim=-1), view.amax(dim=-1), spec)


def quantize_dynamic(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize ``x`` with min/max qparams computed from ``x`` itself (per-token activations)."""
    scale, zero = minmax_qparams(x, spec)
    return fake_quantize(x, scale, zero, spec)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit integers [..., K] (K a multiple of 8) into int32 [..., K / 8].

    Element 8·j + i lands in bits 4·i … 4·i + 3 of word j (little-nibble first).
    """
    if q.shape[-1] % 8:
        raise ValueError(f"pack_int4 needs a last dimension divisible by 8, got {q.shape[-1]}")
    nibbles = q.to(torch.int32).reshape(*q.shape[:-1], -1, 8) & 0xF
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return (nibbles << shifts).sum(dim=-1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: int32 [..., K / 8] → unsigned 4-bit integers (uint8) [..., K]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nibbles.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` up to a multiple of ``multiple``."""
    missing = -x.shape[-1] % multiple
    return F.pad(x, (0, missing)) if missing else x
