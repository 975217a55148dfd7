"""Plain-torch ground truth for the packed kernels, and the CPU path.

Two kinds of linear layer run on packed integers:

- **W4A16 / W8A16** (weight-only; GPTQ, Frantar et al. 2023; AWQ, Lin et al. 2024): y = x · Ŵᵀ + b with
  Ŵ = s · (q − z) per group of input features. Here Ŵ is rebuilt (dequantized) and multiplied in x's dtype.
- **W8A8** (SmoothQuant, Xiao et al. 2023, §3 and eq. 1–2): the activation is quantized per token on the fly,
  x ≈ s_x · q_x with s_x from the row's max|x| (``ptq.affine``'s symmetric convention), the weight per output
  channel, W ≈ s_w · q_w, and
  y = s_x · s_w · (q_x · q_wᵀ) + b with the integer product accumulated exactly in int32.

Kernel layouts (shared with ``triton_w4a16`` / ``triton_w8a8``; see docs/kernels.md):

- int4 weights: ``qweight`` int32 [⌈K/8⌉, N]; input feature k = 8·j + i of output channel n is the nibble in
  bits 4·i … 4·i + 3 of ``qweight[j, n]`` (packed along K, N contiguous, so a K-tile unpacks with shifts and a
  row of words is a coalesced load). Nibbles are unsigned: symmetric integers are stored offset by +8 (the
  implicit zero point is 8, no zeros tensor), asymmetric integers as they are with ``zeros`` uint8 [G, N].
- int8 weights (weight-only): ``qweight`` int8 [N, K]; symmetric as they are (zero 0), asymmetric offset by
  −128 with ``zeros`` int8 [G, N] offset the same way, so q − z is unchanged.
- ``scales`` [G, N] in a float dtype (G = number of groups along K; 1 for per-channel), N contiguous.
- W8A8: ``qweight`` int8 [N, K] (K contiguous: the column-major RHS that int8 tensor cores want) and fp32
  per-output-channel ``weight_scale`` [N]; activations int8 [M, K] with fp32 per-token scales [M, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptq.affine import minmax_qparams, pack_int4, pad_to_multiple, quantize, unpack_int4
from ptq.spec import QuantSpec

INT4_SYM_OFFSET = 8
INT8_ASYM_OFFSET = 128
TOKEN_INT8 = QuantSpec(bits=8, symmetric=True, granularity="token")


# ---- layouts -------------------------------------------------------------------------------------------------


def pack_int4_weight(q: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Integers q [N, K] (affine convention, 4 bits or fewer) → kernel layout int32 [⌈K/8⌉, N].

    K is zero-padded to a multiple of 8; the padded nibbles are never read as weights (kernels mask k ≥ K).
    """
    nibbles = q.to(torch.int32) + (INT4_SYM_OFFSET if symmetric else 0)
    if int(nibbles.min()) < 0 or int(nibbles.max()) > 15:
        raise ValueError("integers do not fit an unsigned nibble: bits must be ≤ 4")
    return pack_int4(pad_to_multiple(nibbles, 8)).t().contiguous()


def unpack_int4_weight(qweight: torch.Tensor, in_features: int, symmetric: bool) -> torch.Tensor:
    """Inverse of ``pack_int4_weight``: int32 [⌈K/8⌉, N] → integers int32 [N, K] in the affine convention."""
    nibbles = unpack_int4(qweight.t())[:, :in_features].to(torch.int32)
    return nibbles - (INT4_SYM_OFFSET if symmetric else 0)


def pack_int8_weight(q: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Integers q [N, K] (affine convention, 5..8 bits) → int8 [N, K] (asymmetric ones shifted by −128)."""
    return (q.to(torch.int32) - (0 if symmetric else INT8_ASYM_OFFSET)).to(torch.int8).contiguous()


def pack_zeros(zero: torch.Tensor, bits_storage: int) -> torch.Tensor:
    """Asymmetric zero points [N, G] (float integers) → [G, N]: uint8 for int4 storage, int8 (−128) for int8."""
    z = zero.t().to(torch.int32)
    if bits_storage == 4:
        return z.to(torch.uint8).contiguous()
    return (z - INT8_ASYM_OFFSET).to(torch.int8).contiguous()


def group_index(in_features: int, group_size: int, device: torch.device) -> torch.Tensor:
    """Group of each input feature: k // group_size (the last group may be shorter)."""
    return torch.arange(in_features, device=device) // group_size


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Ŵ = s · (q − z) as a [N, K] tensor of ``dtype`` from either packed layout (int32 → int4, int8 → int8).

    Computed in fp32 and rounded once, which is what the Triton dequantize kernel does.
    """
    if qweight.dtype == torch.int32:
        stored = unpack_int4_weight(qweight, in_features, symmetric=False)  # raw nibbles
        implicit_zero = INT4_SYM_OFFSET
    else:
        stored = qweight.to(torch.int32)
        implicit_zero = 0
    g = group_index(in_features, group_size, qweight.device)
    s = scales.float()[g].t()
    z = zeros.to(torch.int32)[g].t() if zeros is not None else implicit_zero
    return (s * (stored - z).float()).to(dtype)


# ---- weight-only linear (W4A16, W8A16) -----------------------------------------------------------------------


def weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x · Ŵᵀ + b with Ŵ dequantized to x's dtype; any shape, any device (ragged groups included)."""
    w = dequantize_weight(qweight, scales, zeros, group_size, x.shape[-1], x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---- W8A8 ----------------------------------------------------------------------------------------------------


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per token: x [M, K] → (q int8 [M, K], fp32 scales [M, 1]) as ``ptq.affine`` makes
    them (``minmax_qparams``, ``quantize``)."""
    scale, zero = minmax_qparams(x.float(), TOKEN_INT8)
    return quantize(x, scale, zero, TOKEN_INT8).to(torch.int8), scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product a [M, K] · b [N, K]ᵀ of int8 matrices.

    ``torch._int_mm`` (int32 accumulation, column-major RHS) on CPU, and on CUDA where it takes the shape
    (M > 16, K and N multiples of 8); otherwise float64, exact since |Σ| < 2⁵³ for any practical K.
    """
    (m, k), n = a.shape, b.shape[0]
    if a.device.type == "cpu" or (a.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a.contiguous(), b.t())
    return (a.double() @ b.double().t()).to(torch.int32)


def scaled_int8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Epilogue of W8A8: (q_x · q_wᵀ) · s_x · s_w (+ b) in fp32, written in ``dtype``."""
    acc = int8_matmul(xq, qweight).float()
    y = acc * x_scale.float() * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def w8a8_linear(
    x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SmoothQuant W8A8: per-token int8 activations × per-channel int8 weights, fp32 rescale, x's dtype out."""
    shape = x.shape
    xq, xs = quantize_per_token(x.reshape(-1, shape[-1]))
    y = scaled_int8_linear(xq, xs, qweight, weight_scale, bias, x.dtype)
    return y.reshape(*shape[:-1], qweight.shape[0])
