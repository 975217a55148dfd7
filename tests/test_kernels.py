"""Kernels equal their plain-torch reference, and the reference equals exact math, on fresh odd shapes.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before they are imported; if
another module imported them first they are re-decorated). Outputs are poisoned with NaN before each run so an
element the kernel fails to write cannot pass.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ptq.affine import dequantize, minmax_qparams, quantize  # noqa: E402
from ptq.kernels import reference, triton_w4a16, triton_w8a8  # noqa: E402
from ptq.spec import QuantSpec  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not triton_w4a16.INTERPRETED:
    triton_w4a16, triton_w8a8 = importlib.reload(triton_w4a16), importlib.reload(triton_w8a8)

TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 2e-3}
"""Relative to the output's largest magnitude: fp16/bf16 output rounding; fp32 covers TF32 dots on GPU."""


@triton.jit
def _bf16_dot_probe(a_ptr, o_ptr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    tl.store(o_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, a))


@functools.cache
def bf16_dot_works() -> bool:
    """The interpreter of Triton 3.x does bf16 arithmetic on raw bits; a 16×16 bf16 dot tells."""
    a = torch.randn(16, 16, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(16, 16, device=DEVICE, dtype=torch.float32)
    _bf16_dot_probe[(1,)](a, out)
    return torch.allclose(out, a.float() @ a.float(), rtol=1e-2, atol=1e-2)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """No NaN/inf (unwritten poisoned elements) and within the dtype's tolerance of ``expected``."""
    assert torch.isfinite(out).all(), "kernel left NaN (unwritten) or inf elements"
    tol = TOL[dtype] * scale
    torch.testing.assert_close(out.double(), expected.double(), rtol=tol, atol=tol * float(expected.abs().max()))


def poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)


def random_int4_weight(n: int, k: int, spec: QuantSpec, dtype: torch.dtype, gen: torch.Generator):
    """(qweight, scales, zeros, group) in the kernel layout, from a random float weight quantized by ptq.affine."""
    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    scale, zero = minmax_qparams(w, spec)
    q = quantize(w, scale, zero, spec)
    group = spec.group_size if spec.granularity == "group" else k
    zeros = None if spec.symmetric else reference.pack_zeros(zero, 4).to(DEVICE)
    qweight = reference.pack_int4_weight(q, spec.symmetric).to(DEVICE)
    return qweight, scale.t().contiguous().to(DEVICE, dtype), zeros, group


def exact_linear(x, qweight, scales, zeros, group, bias):
    """float64 x · Ŵᵀ + b: the ground truth the kernels and the reference approximate."""
    w = reference.dequantize_weight(qweight, scales, zeros, group, x.shape[-1], torch.float64)
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


# ---- layouts ---------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 4), symmetric=st.booleans(), n=st.integers(1, 9), k=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_int4_pack_roundtrip_and_bit_layout(bits: int, symmetric: bool, n: int, k: int, seed: int) -> None:
    spec = QuantSpec(bits, symmetric, "channel")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(spec.qmin, spec.qmax + 1, (n, k), generator=gen)
    packed = reference.pack_int4_weight(q, symmetric)
    assert packed.dtype == torch.int32 and packed.shape == (-(-k // 8), n)
    assert torch.equal(reference.unpack_int4_weight(packed, k, symmetric), q.int())
    j, i = divmod(k - 1, 8)  # feature k−1 of channel 0 sits in bits 4i..4i+3 of word (j, 0)
    nibble = (int(packed[j, 0]) >> (4 * i)) & 0xF
    assert nibble == int(q[0, k - 1]) + (8 if symmetric else 0)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), group=st.sampled_from([8, 16, 32, None]),
       k=st.integers(8, 80), seed=st.integers(0, 2**16))
def test_dequantize_weight_equals_affine(bits: int, symmetric: bool, group: int | None, k: int, seed: int) -> None:
    """Both packed layouts dequantize to exactly ptq.affine's s · (q − z), ragged last groups included."""
    spec = QuantSpec(bits, symmetric, "group" if group else "channel", group)
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(seed))
    scale, zero = minmax_qparams(w, spec)
    q = quantize(w, scale, zero, spec)
    storage = 4 if bits <= 4 else 8
    pack = reference.pack_int4_weight if storage == 4 else reference.pack_int8_weight
    zeros = None if symmetric else reference.pack_zeros(zero, storage)
    got = reference.dequantize_weight(pack(q, symmetric), scale.t(), zeros, group or k, k, torch.float32)
    assert torch.equal(got, dequantize(q, scale, zero, spec))


# ---- W4A16 -----------------------------------------------------------------------------------------------------

W4_GROUPS = [32, 64, 128, None]  # None: per-channel
W4_CASES = [
    (group, symmetric, dtype, m, i)
    for i, (group, symmetric, dtype, m) in enumerate(
        itertools.product(W4_GROUPS, [True, False], [torch.float16, torch.bfloat16, torch.float32], [1, 3, 17])
    )
]
W4_SHAPES = [(192, 72), (320, 136), (384, 136)]  # (K, N): K multiple of 32 and 64; 384 also of 128


def w4_shape(group: int | None, i: int) -> tuple[int, int]:
    shapes = [s for s in W4_SHAPES if group is None or s[0] % group == 0]
    return shapes[i % len(shapes)]


@pytest.mark.parametrize(("group", "symmetric", "dtype", "m", "i"), W4_CASES)
def test_w4a16_matches_reference(group: int | None, symmetric: bool, dtype: torch.dtype, m: int, i: int) -> None:
    """Fused (split-K 1 and 3) and dequantize-then-matmul paths equal float64 math, bias on and off.

    The interpreter of Triton 3.x cannot run bf16 dots: there bf16 covers the dequantize path only.
    """
    k, n = w4_shape(group, i)
    gen = torch.Generator().manual_seed(1000 + i)
    spec = QuantSpec(4, symmetric, "group" if group else "channel", group)
    qweight, scales, zeros, g = random_int4_weight(n, k, spec, dtype, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if i % 2 else None
    expected = exact_linear(x, qweight, scales, zeros, g, bias)
    fused = dtype != torch.bfloat16 or bf16_dot_works()
    for path, split_k in [("fused", 1), ("fused", 3)] * fused + [("dequant", None)]:
        out = poisoned(m, n, dtype)
        triton_w4a16.w4a16_linear(x, qweight, scales, zeros, g, bias, out=out, path=path, split_k=split_k)
        assert_matches(out, expected, dtype)
    assert_matches(reference.weight_only_linear(x, qweight, scales, zeros, g, bias), expected, dtype)


@pytest.mark.parametrize(("symmetric", "group"), [(True, 64), (False, 32), (False, None)])
def test_w4a16_large_tiles(symmetric: bool, group: int | None) -> None:
    """M = 70 takes the BLOCK_M = 64 tiles, which dequantize before the dot instead of scaling after it."""
    gen = torch.Generator().manual_seed(70)
    spec = QuantSpec(4, symmetric, "group" if group else "channel", group)
    qweight, scales, zeros, g = random_int4_weight(72, 192, spec, torch.float16, gen)
    x = torch.randn(70, 192, generator=gen).to(DEVICE, torch.float16)
    bias = torch.randn(72, generator=gen).to(DEVICE, torch.float16)
    out = poisoned(70, 72, torch.float16)
    triton_w4a16.w4a16_linear(x, qweight, scales, zeros, g, bias, out=out, path="fused")
    assert_matches(out, exact_linear(x, qweight, scales, zeros, g, bias), torch.float16)


@pytest.mark.parametrize(("k", "group"), [(200, 64), (200, None), (120, 40)])
def test_w4a16_ragged_and_odd_groups(k: int, group: int | None) -> None:
    """K not a multiple of the group, or a group not a multiple of 32, falls back; per-channel odd K is fused."""
    gen = torch.Generator().manual_seed(k + (group or 0))
    spec = QuantSpec(4, False, "group" if group else "channel", group)
    qweight, scales, zeros, g = random_int4_weight(40, k, spec, torch.float16, gen)
    assert triton_w4a16.kernel_supports(k, g) == (group is None)
    x = torch.randn(2, 3, k, generator=gen).to(DEVICE, torch.float16)
    out = triton_w4a16.w4a16_linear(x, qweight, scales, zeros, g)
    assert out.shape == (2, 3, 40)
    assert_matches(out.reshape(6, 40), exact_linear(x.reshape(6, k), qweight, scales, zeros, g, None), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_kernel_is_exact(dtype: torch.dtype) -> None:
    """The large-M path's dequantization rounds s · (q − z) once, exactly as the reference."""
    gen = torch.Generator().manual_seed(7)
    for spec in (QuantSpec(4, True, "group", 64), QuantSpec(4, False, "group", 32), QuantSpec(3, False, "channel")):
        qweight, scales, zeros, g = random_int4_weight(72, 192, spec, dtype, gen)
        got = triton_w4a16.dequantize(qweight, scales, zeros, g, 192, dtype)
        assert torch.equal(got, reference.dequantize_weight(qweight, scales, zeros, g, 192, dtype).t())


def test_w4a16_int8_weights_fall_back() -> None:
    """int8 weight-only layers (bits 5..8) run the reference through the same entry point."""
    spec = QuantSpec(8, False, "group", 64)
    w = torch.randn(40, 128)
    scale, zero = minmax_qparams(w, spec)
    qweight = reference.pack_int8_weight(quantize(w, scale, zero, spec), False).to(DEVICE)
    zeros, scales = reference.pack_zeros(zero, 8).to(DEVICE), scale.t().contiguous().to(DEVICE, torch.float16)
    x = torch.randn(5, 128).to(DEVICE, torch.float16)
    out = triton_w4a16.w4a16_linear(x, qweight, scales, zeros, 64)
    assert_matches(out, exact_linear(x, qweight, scales, zeros, 64, None), torch.float16)


def test_split_k_heuristic_and_config_pruning() -> None:
    assert triton_w4a16.choose_split_k(64, 4096, 4096, torch.device("cpu")) == 1
    for m, n, k in [(1, 4096, 4096), (16, 14336, 4096), (1, 4096, 14336), (1, 72, 192)]:
        split = triton_w4a16.choose_split_k(m, n, k, torch.device("cpu"))
        assert 1 <= split <= 16 and (split == 1 or k // split >= 2 * triton_w4a16.K_SPLIT_ALIGN)
    for bucket, configs in triton_w4a16.BUCKET_CONFIGS.items():
        for group, k in ((32, 4096), (64, 4096), (96, 4096), (128, 14336), (200, 200)):
            kept = triton_w4a16._prune(configs, {"K": k}, GROUP=group)
            assert kept and len(kept) <= len(configs), bucket
            assert all(c.kwargs["BLOCK_K"] >= 32 and (group == k or group % c.kwargs["BLOCK_K"] == 0) for c in kept)


# ---- W8A8 ------------------------------------------------------------------------------------------------------

W8_CASES = list(itertools.product([1, 3, 17], [(192, 72), (320, 136), (200, 40)], [torch.float16, torch.bfloat16,
                                                                                    torch.float32]))


@pytest.mark.parametrize(("m", "shape", "dtype"), W8_CASES)
def test_per_token_quant_kernel_is_bit_exact(m: int, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Integers and scales equal the reference exactly, zero rows and outliers included; |x − s·q| ≤ s/2."""
    k = shape[0]
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen)
    x[0, k // 3] = 300.0  # an outlier channel
    if m > 1:
        x[1] = 0.0
    x = x.to(DEVICE, dtype)
    q = torch.full((m, k), 99, device=DEVICE, dtype=torch.int8)
    s = torch.full((m, 1), float("nan"), device=DEVICE)
    triton_w8a8.quantize_per_token(x, out=(q, s))
    q_ref, s_ref = reference.quantize_per_token(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
    assert ((x.float() - s * q.float()).abs() <= s * (0.5 + 1e-5)).all()  # + fp32 rounding of x / s and s · q


@pytest.mark.parametrize(("m", "shape", "dtype"), W8_CASES)
def test_w8a8_matches_reference(m: int, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The int8 GEMM + epilogue equals the reference (exact int32 products), bias on and off."""
    k, n = shape
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    qweight = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
    weight_scale = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if (m + n) % 2 else None
    out = poisoned(m, n, dtype)
    triton_w8a8.w8a8_linear(x, qweight, weight_scale, bias, out=out)
    # bf16 stores truncate in the interpreter: allow one bf16 ulp (relative 2^-7)
    assert_matches(out, reference.w8a8_linear(x, qweight, weight_scale, bias).float(), dtype, scale=0.5)


def test_w8a8_is_close_to_float_product() -> None:
    """Per-token int8 activations × int8 weights approximate the float product (SmoothQuant's premise)."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(17, 320, generator=gen), torch.randn(136, 320, generator=gen)
    spec = QuantSpec(8, True, "channel")
    scale, zero = minmax_qparams(w, spec)
    qweight = quantize(w, scale, zero, spec).to(torch.int8)
    y = triton_w8a8.w8a8_linear(x.to(DEVICE), qweight.to(DEVICE), scale.reshape(-1).to(DEVICE)).cpu()
    exact = x.double() @ w.double().t()
    assert float((y - exact).norm() / exact.norm()) < 0.02
