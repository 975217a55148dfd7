"""QuantLinear computes what the calibrated fake-quant Linear computes, in ≈ bits/16 of the fp16 memory.

The triton backend runs in the interpreter without CUDA (TRITON_INTERPRET=1, set before the kernels are
imported; re-decorated if another module imported them first).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from ptq.affine import dequantize, fake_quantize, minmax_qparams, quantize, quantize_dynamic  # noqa: E402
from ptq.packed import QuantLinear, act_order_permutation, convert, storage_mode  # noqa: E402
from ptq.spec import QuantSpec  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKEN8 = QuantSpec(8, True, "token")
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def triton_backend_available() -> bool:
    """Triton importable, and its kernel modules decorated for this machine (interpreter on CPU)."""
    try:
        from ptq.kernels import triton_w4a16, triton_w8a8
    except ImportError:
        return False
    if DEVICE.type == "cpu" and not triton_w4a16.INTERPRETED:
        importlib.reload(triton_w4a16)
        importlib.reload(triton_w8a8)
    return True


BACKENDS = ["torch"] + (["triton"] if triton_backend_available() else [])


class Calibrated(nn.Module):
    """The calibration contract: ``weight`` dequantized, plus weight_scale / weight_zero / weight_spec / input_spec."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None,
                 input_spec: QuantSpec | None = None) -> None:
        super().__init__()
        scale, zero = minmax_qparams(weight, spec)
        self.weight = nn.Parameter(fake_quantize(weight, scale, zero, spec), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero", zero)
        self.weight_spec, self.input_spec = spec, input_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_spec is not None:
            x = quantize_dynamic(x, self.input_spec)
        return F.linear(x, self.weight, self.bias)


def calibrated(n: int, k: int, spec: QuantSpec, dtype: torch.dtype, bias: bool = True,
               input_spec: QuantSpec | None = None, seed: int = 0) -> Calibrated:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return Calibrated(w, spec, b, input_spec).to(DEVICE)


def assert_logits_match(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert out.dtype == expected.dtype and torch.isfinite(out).all()
    tol = TOL[dtype] * scale
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * float(expected.abs().max()))


SPECS = [
    pytest.param(QuantSpec(4, True, "group", 32), None, id="w4-sym-g32"),
    pytest.param(QuantSpec(4, False, "group", 64), None, id="w4-asym-g64"),
    pytest.param(QuantSpec(3, False, "group", 32), None, id="w3-asym-g32"),
    pytest.param(QuantSpec(4, False, "group", 64), None, id="w4-asym-ragged"),  # K = 200: last group of 8
    pytest.param(QuantSpec(4, True, "channel"), None, id="w4-sym-channel"),
    pytest.param(QuantSpec(8, False, "group", 64), None, id="w8-asym-g64"),
    pytest.param(QuantSpec(6, True, "tensor"), None, id="w6-sym-tensor"),
    pytest.param(QuantSpec(8, True, "channel"), TOKEN8, id="w8a8"),
    pytest.param(QuantSpec(4, True, "tensor"), TOKEN8, id="w4a8-int-gemm"),
    pytest.param(QuantSpec(4, False, "group", 32), TOKEN8, id="w4-g32-a8-emulated"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("spec", "input_spec"), SPECS)
def test_quant_linear_matches_fake_quant_linear(spec: QuantSpec, input_spec: QuantSpec | None, dtype: torch.dtype,
                                                backend: str, request: pytest.FixtureRequest) -> None:
    """Logits of the packed layer equal the fake-quant Linear's (dequantized weights) within dtype tolerance."""
    k = 200 if "ragged" in request.node.name else 192
    fake = calibrated(72, k, spec, dtype, input_spec=input_spec, seed=k + spec.bits)
    layer = convert(fake, backend)
    assert isinstance(layer, QuantLinear) and layer.mode == storage_mode(spec, input_spec)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with torch.no_grad():
        expected, out = fake(x), layer(x)
    # per-token int8: an activation rounding to the other side of .5 moves one output by s_x·s_w·|q_w| (rare)
    assert_logits_match(out, expected, dtype, scale=4.0 if input_spec is not None else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_act_order_g_idx(backend: str) -> None:
    """GPTQ act-order: groups are a permutation of the columns; packed storage follows g_idx, not j // g."""
    n, k, g = 40, 128, 32
    spec = QuantSpec(4, False, "group", g)
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[order] = torch.arange(k) // g
    w = torch.randn(n, k, generator=gen)
    w_grouped = w[:, order]  # columns in processing order: group j // g
    scale, zero = minmax_qparams(w_grouped, spec)
    deq_grouped = fake_quantize(w_grouped, scale, zero, spec)
    deq = torch.empty_like(deq_grouped)
    deq[:, order] = deq_grouped
    assert act_order_permutation(torch.arange(k) // g, g) is None
    layer = QuantLinear.from_float(deq.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), spec, backend=backend,
                                   g_idx=g_idx.to(DEVICE))
    x = torch.randn(5, k, generator=gen).to(DEVICE)
    assert_logits_match(layer(x), F.linear(x, deq.to(DEVICE)), torch.float32)
    with pytest.raises(ValueError, match="g_idx"):
        act_order_permutation(torch.zeros(k, dtype=torch.long), g)


@pytest.mark.parametrize(("spec", "expected_bytes"), [
    (QuantSpec(4, True, "group", 128), 512 * 1024 // 2 + (1024 // 128) * 512 * 2),
    (QuantSpec(4, False, "group", 128), 512 * 1024 // 2 + (1024 // 128) * 512 * (2 + 1)),
    (QuantSpec(8, True, "channel"), 512 * 1024 + 512 * 2),
])
def test_parameter_memory(spec: QuantSpec, expected_bytes: int) -> None:
    """Packed bytes = bits/8 per weight (4 or 8 stored bits) + fp16 scales (+ 8-bit zero points), no bias."""
    fake = calibrated(512, 1024, spec, torch.float16, bias=False)
    layer = convert(fake, "torch")
    assert layer.parameter_bytes() == expected_bytes
    fp16_bytes = 512 * 1024 * 2
    assert abs(layer.parameter_bytes() / fp16_bytes - spec.bits / 16) < 0.02


def test_state_dict_round_trip() -> None:
    """A QuantLinear built from shapes alone loads a packed state dict and computes the same."""
    spec = QuantSpec(4, False, "group", 64)
    packed = convert(calibrated(72, 192, spec, torch.float16), "torch")
    fresh = QuantLinear(192, 72, spec, bias=True, dtype=torch.float16, device=DEVICE)
    fresh.load_state_dict(packed.state_dict())
    x = torch.randn(4, 192).to(DEVICE, torch.float16)
    assert torch.equal(fresh(x), packed(x))


def test_convert_swaps_exactly_the_calibrated_modules() -> None:
    spec = QuantSpec(4, True, "group", 32)
    model = nn.Sequential(
        nn.Linear(64, 64),
        nn.Sequential(calibrated(96, 64, spec, torch.float32), nn.ReLU()),
        calibrated(32, 96, QuantSpec(8, True, "channel"), torch.float32, bias=False, input_spec=TOKEN8),
    ).to(DEVICE)
    x = torch.randn(3, 64).to(DEVICE)
    with torch.no_grad():
        expected = model(x)
        plain = model[0]
        assert convert(model, "torch") is model
    assert model[0] is plain
    assert isinstance(model[1][0], QuantLinear) and model[1][0].mode == "w4"
    assert isinstance(model[1][1], nn.ReLU)
    assert isinstance(model[2], QuantLinear) and model[2].mode == "w8a8" and model[2].bias is None
    with torch.no_grad():
        assert_logits_match(model(x), expected, torch.float32, scale=40.0)  # int8 activations in the last layer
    with pytest.raises(ValueError, match="backend"):
        convert(model, "cuda")


def test_convert_accepts_ptq_fake_quant_linear() -> None:
    """The contract as ptq.nn.FakeQuantLinear provides it: g_idx, and dynamic or static activation quantizers."""
    nn_module = pytest.importorskip("ptq.nn")
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64)
    static_spec = QuantSpec(8, False, "tensor")
    static_scale, static_zero = minmax_qparams(x.reshape(1, -1), static_spec)
    quantizers = [None, nn_module.ActivationQuantizer(TOKEN8),
                  nn_module.ActivationQuantizer(static_spec, static_scale, static_zero)]
    layers = []
    for i, quantizer in enumerate(quantizers):
        spec = QuantSpec(4, False, "group", 32) if i != 1 else QuantSpec(8, True, "channel")
        linear = nn.Linear(64, 64)
        scale, zero = minmax_qparams(linear.weight.detach(), spec)
        q = quantize(linear.weight.detach(), scale, zero, spec)
        deq = dequantize(q, scale, zero, spec)
        g_idx = torch.arange(64) // 32 if spec.granularity == "group" else torch.zeros(64, dtype=torch.long)
        layers.append(nn_module.FakeQuantLinear(linear, deq, spec, scale, zero, q, g_idx=g_idx,
                                                input_quantizer=quantizer))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        expected = model(x)
        convert(model, "torch")
        assert all(isinstance(m, QuantLinear) for m in model)
        assert [m.mode for m in model] == ["w4", "w8a8", "w4"]
        assert model[2].input_scale is not None
        assert_logits_match(model(x), expected, torch.float32, scale=40.0)  # int8 activation rounding flips


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU tensors only")
def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = convert(calibrated(8, 64, QuantSpec(4, True, "group", 32), torch.float32), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        layer(torch.randn(2, 64))
