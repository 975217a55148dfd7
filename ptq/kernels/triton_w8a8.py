"""Triton W8A8: dynamic per-token int8 activations × per-channel int8 weights (SmoothQuant, Xiao et al. 2023).

Two kernels (SmoothQuant §3, eq. 1–2 with per-token activation and per-channel weight scales):

1. ``quantize_per_token``: one program per row, two passes over K (max |x|, then q = round(x / s)); s =
   max(max|x|, 1e-8) / HALF_RANGE in fp32, IEEE division (``div_rn``), round-half-to-even and a clamp to
   [−128, 127], so q and s equal ``reference.quantize_per_token`` (that is, ``ptq.affine``) bit for bit.
2. ``scaled_int8_linear``: int8 × int8 → int32 with ``tl.dot`` (exact), epilogue y = acc · s_x[m] · s_w[n] (+ b)
   in fp32, written in fp16/bf16/fp32. The weight is int8 [N, K] with K contiguous, the column-major RHS that
   int8 tensor cores (and ``torch._int_mm``) expect.

Autotune configs are keyed by M bucket; under ``TRITON_INTERPRET=1`` one fixed config runs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ptq import affine
from ptq.kernels.dispatch import interpreter_on
from ptq.kernels.reference import TOKEN_INT8

INTERPRETED = interpreter_on()
"""Read once, when the kernels below are decorated: ``triton.jit`` makes interpreted functions iff it is set.
The kernels call only Triton builtins and their own helpers, not ``triton.language.standard``'s jit functions
(``tl.cdiv``, ``tl.zeros``, ``tl.max``), so they also interpret when Triton was imported before the flag was set."""
HALF_RANGE = tl.constexpr((TOKEN_INT8.qmax - TOKEN_INT8.qmin) / 2)
"""ptq.affine's symmetric scale is max|x| / ((qmax − qmin) / 2) = max|x| / 127.5 for int8."""
EPS = tl.constexpr(affine.EPS)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _round_half_even(v):
    """Round to nearest, ties to even (torch.round), exactly: v − floor(v) is exact in floating point."""
    f = tl.floor(v)
    d = v - f
    return tl.where((d > 0.5) | ((d == 0.5) & (f % 2 != 0)), f + 1.0, f)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
    """Row m: s = max(max|x|, eps) / HALF_RANGE, q = clamp(round(x / s), −128, 127)."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK)
    amax = tl.full((BLOCK,), 0, tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.maximum(tl.reduce(amax, 0, _max), EPS), HALF_RANGE)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(_round_half_even(tl.math.div_rn(x, scale)), -128.0, 127.0)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(tl.int8), mask=k0 + offs < K)


@triton.jit
def _w8a8_kernel(
    a_ptr,
    w_ptr,
    sa_ptr,
    sw_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of (q_a · q_wᵀ) · s_a · s_w (+ b), int32 accumulation."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + rk
        in_k = offs_k < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + offs_k[None, :], mask=in_k[None, :], other=0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + offs_k[:, None], mask=in_k[:, None], other=0)
        acc = tl.dot(a, w, acc)

    y = acc.to(tl.float32) * tl.load(sa_ptr + rm)[:, None] * tl.load(sw_ptr + rn)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


BUCKET_CONFIGS: dict[str, list[triton.Config]] = {
    "decode": [_config(16, 64, bk, 4, st) for bk in (64, 128, 256) for st in (3, 4, 5)],
    "small": [_config(32, bn, bk, 8, st) for bn, bk in ((64, 128), (128, 64), (128, 128), (256, 64)) for st in (3, 4)]
    + [_config(64, bn, bk, 8, st) for bn, bk in ((64, 128), (128, 64), (128, 128)) for st in (3, 4)],
    "large": [_config(bm, bn, 64, 8, st) for bm, bn in ((128, 64), (128, 128), (64, 128)) for st in (3, 4, 5)],
}
"""Autotune search spaces per M bucket. Chosen for H100 without a GPU run: tiles whose sm_90a build (Triton 3.9,
ptxas -v) spills registers were left out; timings are still to be measured."""
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}


def _bucket(m: int) -> str:
    return "decode" if m <= 16 else "small" if m <= 128 else "large"


@functools.cache
def _tuned(bucket: str) -> triton.runtime.Autotuner:
    return triton.autotune(configs=BUCKET_CONFIGS[bucket], key=["N", "K"])(_w8a8_kernel)


def quantize_per_token(
    x: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (fp16/bf16/fp32) → (q int8 [M, K], fp32 scales [M, 1]), symmetric, one scale per row."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q, s = out if out is not None else (
        torch.empty(m, k, device=x.device, dtype=torch.int8), torch.empty(m, 1, device=x.device, dtype=torch.float32)
    )
    block = min(triton.next_power_of_2(max(k, 16)), 64 if INTERPRETED else 4096)
    if m:
        _act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block)
    return q, s


def scaled_int8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(q_x [M, K] · q_w [N, K]ᵀ) · s_x [M, 1] · s_w [N] (+ b) → [M, N] in ``dtype``."""
    m, k = xq.shape
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, device=xq.device, dtype=dtype)
    if m == 0:
        return out
    args = (xq, qweight, x_scale, weight_scale, bias if bias is not None else weight_scale, out,
            m, n, k, xq.stride(0), qweight.stride(0), out.stride(0))

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if INTERPRETED:
        _w8a8_kernel[grid](*args, HAS_BIAS=bias is not None, **INTERPRETER_CONFIG)
    else:
        _tuned(_bucket(m))[grid](*args, HAS_BIAS=bias is not None)
    return out


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token int8 quantization of x [..., K] fused in one kernel, then the int8 GEMM; y in x's dtype."""
    shape = x.shape
    xq, xs = quantize_per_token(x.reshape(-1, shape[-1]))
    y = scaled_int8_linear(xq, xs.reshape(-1), qweight, weight_scale, bias, x.dtype, out=out)
    return y.reshape(*shape[:-1], qweight.shape[0])
