"""Triton W4A16: int4 weights, fp16/bf16 activations, dequantization fused into the GEMM main loop.

The weight-only scheme of GPTQ (Frantar et al. 2023) and AWQ (Lin et al. 2024): y = x · Ŵᵀ + b with
Ŵ[n, k] = s[g, n] · (q[k, n] − z[g, n]), g = k // group_size. Layout (see ``reference`` and docs/kernels.md):
``qweight`` int32 [⌈K/8⌉, N], nibble i of word (j, n) is input feature 8·j + i; ``scales`` [G, N] (any float
dtype); ``zeros`` uint8 [G, N] for asymmetric weights, ``None`` for symmetric ones (implicit zero 8).

Inner loop, per K-tile of BLOCK_K features, which lies inside one group (BLOCK_K divides the group size):
load the compact [BLOCK_K / 8, BLOCK_N] tile of words (coalesced along N; each weight byte crosses memory and
shared memory once), unpack in registers (shift by 0, 4, …, 28, mask, reshape to [BLOCK_K, BLOCK_N]), subtract
the zero point (exact small integers in x's dtype), and accumulate in fp32. For BLOCK_M ≤ 32 the tile is
scaled after the dot, ``acc += dot(x_tile, q − z) · s`` (exact algebra, s is constant over the tile: BLOCK_M ×
BLOCK_N multiplies instead of BLOCK_K × BLOCK_N); larger tiles dequantize first, ``acc = dot(x_tile, s · (q − z),
acc)``, which accumulates in place and keeps the register budget of one accumulator.

Paths, chosen by M (the number of tokens):

- M ≤ 16 (decode): BLOCK_M = 16 and split-K: each program reduces a K-slice into an fp32 partial sum, a second
  small kernel adds the partials, the bias and casts (deterministic, no atomics). Keeps all SMs busy on GEMV-
  shaped problems that have only N / BLOCK_N output tiles.
- 16 < M < LARGE_M: the fused tiled GEMM, autotuned per M bucket.
- M ≥ LARGE_M: dequantize to a [K, N] tensor once (one memory-bound kernel), then cuBLAS via ``torch.addmm``;
  compute-bound, so the dequantization is amortised over M rows.

Under ``TRITON_INTERPRET=1`` there is no autotuning: each bucket runs one fixed, small config.
Shapes the kernel does not take (K not a multiple of the group, or a group size that is not a multiple of 32)
and int8 weights (W8A16) fall back to ``reference.weight_only_linear``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ptq.kernels import reference
from ptq.kernels.dispatch import interpreter_on

LARGE_M = 1024
"""From this many tokens on, dequantize + cuBLAS. A first guess: not yet measured (scripts/bench_kernels.py)."""
DECODE_M = 16
K_SPLIT_ALIGN = 128
"""Split-K slices are multiples of this (the largest BLOCK_K of any config), so no tile crosses a group."""
MIN_GROUP_MULTIPLE = 32


INTERPRETED = interpreter_on()
"""Read once, when the kernels below are decorated: ``triton.jit`` makes interpreted functions iff it is set.
The kernels call only Triton builtins and their own helpers, not ``triton.language.standard``'s jit functions
(``tl.cdiv``, ``tl.zeros``, ``tl.max``), so they also interpret when Triton was imported before the flag was set."""


@triton.jit
def _unpack(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K / 8, BLOCK_N] int32 words → [BLOCK_K, BLOCK_N] nibbles: row 8·j + i is nibble i of word row j."""
    shifts = tl.arange(0, 8) * 4
    return tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))


@triton.jit
def _w4a16_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,
    ASYM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over one K-slice; SPLIT_K > 1 writes fp32 partials [SPLIT_K, M, N]."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped tile order: GROUP_M row-tiles share the weight columns they stream, which stay in L2.
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols: loads need no mask, the store masks the real ones
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    rj = tl.arange(0, BLOCK_K // 8)
    words_k = (K + 7) // 8

    k_start = pid_k * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
        offs_j = k0 // 8 + rj
        words = tl.load(qw_ptr + offs_j[:, None] * N + rn[None, :], mask=(offs_j < words_k)[:, None], other=0)
        nibbles = _unpack(words, BLOCK_K, BLOCK_N)
        g = k0 // GROUP
        if ASYM:
            zero = tl.load(z_ptr + g * N + rn).to(tl.int32)
            w = nibbles - zero[None, :]
        else:
            w = nibbles - 8
        scale = tl.load(s_ptr + g * N + rn).to(tl.float32)
        if BLOCK_M <= 32:  # few rows: scale the [BLOCK_M, BLOCK_N] product, not the [BLOCK_K, BLOCK_N] tile
            acc += tl.dot(x, w.to(x.dtype)) * scale[None, :]
        else:  # many rows: dequantize the tile and accumulate in place (no second accumulator in registers)
            acc = tl.dot(x, (w.to(tl.float32) * scale[None, :]).to(x.dtype), acc)

    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    else:
        out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, b_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """out[m, n] = Σ_s part[s, m, n] (+ b[n]), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < M * N
    acc = tl.full((BLOCK,), 0, tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=valid, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, GROUP: tl.constexpr, ASYM: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Ŵᵀ [K, N] = s · (q − z), computed in fp32 and rounded once to w's dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    nibbles = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
    slot = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
    zero = tl.load(z_ptr + slot, mask=mask, other=0).to(tl.int32) if ASYM else 8
    w = (nibbles - zero).to(tl.float32) * tl.load(s_ptr + slot, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


BUCKET_CONFIGS: dict[str, list[triton.Config]] = {
    "decode": [_config(16, bn, bk, 4, st) for bn in (32, 64, 128) for bk in (64, 128) for st in (3, 4, 5)],
    "small": [_config(32, bn, bk, 4, st) for bn in (64, 128) for bk in (64, 128) for st in (3, 4)]
    + [_config(64, bn, 64, 8, st) for bn in (64, 128) for st in (3, 4)],
    "medium": [_config(bm, bn, 64, 8, st) for bm in (64, 128) for bn in (128, 256) for st in (3, 4)],
}
"""Autotune search spaces per M bucket (BLOCK_K shrunk per group size by ``_prune``). Chosen for H100 without a
GPU run: tiles whose sm_90a build (Triton 3.9, ptxas -v) spills registers were left out; not yet timed."""
INTERPRETER_CONFIGS = {
    bucket: {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}
    for bucket, bm in (("decode", 16), ("small", 32), ("medium", 64))
}
"""One small config per bucket under the interpreter; BLOCK_M 16/32 and 64 run both scaling orders."""


def _bucket(m: int) -> str:
    return "decode" if m <= DECODE_M else "small" if m <= 64 else "medium"


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Shrink BLOCK_K to divide the group, so that a K-tile never straddles two scales (per-channel: any BLOCK_K);
    configs that become identical are kept once."""
    group, k = kwargs["GROUP"], named_args["K"]
    kept: dict[tuple, triton.Config] = {}
    for c in configs:
        block_k = c.kwargs["BLOCK_K"] if group >= k else math.gcd(c.kwargs["BLOCK_K"], group)
        pruned = _config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_k, c.num_warps, c.num_stages)
        kept.setdefault((*pruned.kwargs.values(), c.num_warps, c.num_stages), pruned)
    return list(kept.values())


@functools.cache
def _tuned(bucket: str) -> triton.runtime.Autotuner:
    return triton.autotune(
        configs=BUCKET_CONFIGS[bucket],
        key=["N", "K", "GROUP", "ASYM", "SPLIT_K"],
        prune_configs_by={"early_config_prune": _prune},
    )(_w4a16_kernel)


def kernel_supports(in_features: int, group_size: int) -> bool:
    """Whether the fused kernel takes this shape: per-channel (group = K), or K a multiple of a group size that is
    itself a multiple of 32. Anything else (ragged last group) runs the reference."""
    if group_size >= in_features:
        return True
    return in_features % group_size == 0 and group_size % MIN_GROUP_MULTIPLE == 0


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K for decode so that about two waves of programs cover the GPU (GEMV shapes have few N-tiles)."""
    if m > DECODE_M:
        return 1
    tiles = triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * _multiprocessors(device) and k // (2 * split) >= 2 * K_SPLIT_ALIGN and split < 16:
        split *= 2
    return split


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantized weight, transposed: Ŵᵀ [K, N] in ``dtype`` (the operand of the large-M cuBLAS path)."""
    n = qweight.shape[1]
    w = torch.empty(in_features, n, device=qweight.device, dtype=dtype)
    block_k, block_n = 32, 64
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, w, n, in_features,
        GROUP=group_size, ASYM=zeros is not None, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return w


def _fused(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
    bias: torch.Tensor | None, out: torch.Tensor, split_k: int,
) -> None:
    m, k = x.shape
    n = qweight.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), K_SPLIT_ALIGN) * K_SPLIT_ALIGN
    split_k = triton.cdiv(k, k_per_split)
    target = out if split_k == 1 else torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    args = (x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, target,
            m, n, k, k_per_split, x.stride(0), target.stride(0) if split_k == 1 else n)
    flags = {"GROUP": group_size, "ASYM": zeros is not None, "HAS_BIAS": bias is not None, "SPLIT_K": split_k}

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k

    if INTERPRETED:
        _w4a16_kernel[grid](*args, **flags, **INTERPRETER_CONFIGS[_bucket(m)])
    else:
        _tuned(_bucket(m))[grid](*args, **flags)
    if split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else target, out, m, n, out.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block,
        )


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str = "auto",
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x · Ŵᵀ + b for x [..., K] in fp16/bf16/fp32 (fp32 runs the dot in TF32 on GPU); y in x's dtype.

    ``path``: "auto" (by M, see the module docstring), "fused" or "dequant". ``split_k``: K-slices of the fused
    kernel (None: heuristic for decode shapes, 1 otherwise). ``out``: an [M, N] buffer to write into.
    """
    shape = x.shape
    k, n = shape[-1], qweight.shape[1] if qweight.dtype == torch.int32 else qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    group_size = min(group_size, k)
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if qweight.dtype != torch.int32 or not kernel_supports(k, group_size) or m == 0:
        out.copy_(reference.weight_only_linear(x2, qweight, scales, zeros, group_size, bias))
    elif path == "dequant" or (path == "auto" and m >= LARGE_M):
        w = dequantize(qweight, scales, zeros, group_size, k, x.dtype)
        if bias is None:
            torch.mm(x2, w, out=out)
        else:
            torch.addmm(bias.to(x.dtype), x2, w, out=out)
    elif path in ("auto", "fused"):
        _fused(x2, qweight, scales, zeros, group_size, bias, out, split_k or choose_split_k(m, n, k, x.device))
    else:
        raise ValueError(f"path={path!r}: allowed are auto, fused, dequant")
    return out.reshape(*shape[:-1], n)
