"""Properties that make GPTQ (ptq.transforms.gptq) right, on small correlated layers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptq.affine import fake_quantize
from ptq.observers import build_observer
from ptq.spec import QuantSpec
from ptq.transforms.gptq import HessianAccumulator, gptq_quantize

OUT = 64


def layer(features: int, seed: int = 0, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs X = Z A + 0.3 Z with four large-variance channels, and a Gaussian weight [OUT, features]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, features, generator=g)
    x = z @ (torch.randn(features, features, generator=g) / features**0.5) + 0.3 * z
    x[:, :4] *= 10
    return x, torch.randn(OUT, features, generator=g)


def hessian_of(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1], dtype=dtype)
    acc.add(x)
    return acc.hessian


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ (w - w_hat).T).norm())


def rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale, zero = build_observer("minmax", spec)(w)
    return fake_quantize(w, scale, zero, spec)


def dequantized(result) -> torch.Tensor:
    """Ŵ[:, j] = scale[:, g_idx[j]] · (q[:, j] − zero[:, g_idx[j]]), the layout GPTQResult documents."""
    return result.scale[:, result.g_idx] * (result.q - result.zero[:, result.g_idx])


def test_hessian_accumulator_is_the_running_mean_of_2xxT():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 24, dtype=torch.float64)
    acc = HessianAccumulator(24, dtype=torch.float64)
    acc.add(x[:1])
    acc.add(x[1:, :7])
    acc.add(x[1:, 7:].reshape(-1, 24))
    acc.add(x[:0])
    flat = torch.cat([x[0], x[1:, :7].reshape(-1, 24), x[1:, 7:].reshape(-1, 24)])
    assert acc.tokens == 150
    assert acc.hessian.dtype == torch.float64
    torch.testing.assert_close(acc.hessian, 2 / 150 * flat.T @ flat, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(4, 23))


SPECS = [
    (96, QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32)),
    (96, QuantSpec(bits=3, symmetric=True, granularity="group", group_size=32)),
    (96, QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)),
    (96, QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32)),
    (96, QuantSpec(bits=4, symmetric=True, granularity="channel", group_size=None)),
    (96, QuantSpec(bits=3, symmetric=False, granularity="channel", group_size=None)),
    (200, QuantSpec(bits=4, symmetric=True, granularity="group", group_size=64)),  # ragged last group of 8
    (200, QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64)),
]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("features", "spec"), SPECS)
def test_output_error_below_rtn(features, spec, act_order):
    x, w = layer(features, seed=features + spec.bits)
    result = gptq_quantize(w, hessian_of(x), spec, act_order=act_order)
    assert output_error(x, w, result.weight) < 0.8 * output_error(x, w, rtn(w, spec))


@pytest.mark.parametrize("act_order", [False, True])
def test_loss_is_the_damped_quadratic_form(act_order):
    # Each OBS step adds exactly ½ (w − q)² / [H⁻¹]_qq to ½ tr(ΔW H_λ ΔWᵀ), so the summed losses equal it.
    x, w = layer(96, seed=3)
    h = hessian_of(x, torch.float64)
    result = gptq_quantize(w.double(), h, SPECS[1][1], act_order=act_order)
    delta = w.double() - result.weight.double()
    damped = h + result.damp * torch.eye(96, dtype=torch.float64)
    assert result.damp == pytest.approx(0.01 * float(torch.diag(h).mean()))
    assert result.loss == pytest.approx(0.5 * float(((delta @ damped) * delta).sum()), rel=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32),
        QuantSpec(bits=4, symmetric=True, granularity="group", group_size=48),  # groups straddle 128-blocks
        QuantSpec(bits=3, symmetric=True, granularity="channel", group_size=None),
    ],
)
def test_lazy_batching_is_exact(spec, act_order):
    x, w = layer(200, seed=7)
    h = hessian_of(x, torch.float64)
    results = [gptq_quantize(w.double(), h, spec, block_size=b, act_order=act_order) for b in (1, 7, 128, 1000)]
    for other in results[1:]:
        assert torch.equal(other.q, results[0].q)
        torch.testing.assert_close(other.weight, results[0].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(other.scale, results[0].scale, rtol=1e-6, atol=1e-7)
        assert other.loss == pytest.approx(results[0].loss, rel=1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("static_groups", [False, True])
def test_weight_is_its_groups_dequantization_under_act_order(static_groups, symmetric):
    x, w = layer(200, seed=11)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="group", group_size=64)
    h = hessian_of(x)
    result = gptq_quantize(w, h, spec, act_order=True, static_groups=static_groups)

    assert result.scale.shape == result.zero.shape == (OUT, 4)
    assert result.g_idx.dtype == torch.long and result.g_idx.shape == (200,)
    assert torch.bincount(result.g_idx).tolist() == [64, 64, 64, 8]
    assert torch.equal(result.weight, dequantized(result))
    perm = torch.argsort(torch.diag(h), descending=True)
    if static_groups:
        assert torch.equal(result.g_idx, torch.arange(200) // 64)
        scale, zero = build_observer("minmax", spec)(w)
        assert torch.equal(result.scale, scale) and torch.equal(result.zero, zero)
    else:
        assert torch.equal(result.g_idx[perm], torch.arange(200) // 64)
        assert not bool((result.g_idx.diff() >= 0).all())


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32),
        QuantSpec(bits=3, symmetric=False, granularity="channel", group_size=None),
        QuantSpec(bits=2, symmetric=False, granularity="tensor", group_size=None),
    ],
)
def test_layout_without_act_order(spec):
    x, w = layer(96, seed=5)
    result = gptq_quantize(w, hessian_of(x), spec)
    slots = spec.n_groups(96)
    assert torch.equal(result.g_idx, torch.arange(96) // 32 if slots > 1 else torch.zeros(96, dtype=torch.long))
    rows = 1 if spec.granularity == "tensor" else OUT
    assert result.scale.shape == result.zero.shape == (rows, slots)
    assert torch.equal(result.weight, dequantized(result))


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 12),
    features=st.integers(1, 40),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    group_size=st.sampled_from([None, 1, 3, 8, 16]),
    block_size=st.sampled_from([1, 5, 128]),
    act_order=st.booleans(),
    static_groups=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_integers_in_range_and_layout_on_any_shape(
    out, features, bits, symmetric, group_size, block_size, act_order, static_groups, seed
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * features + 3, features, generator=g) * torch.rand(features, generator=g) * 4
    w = torch.randn(out, features, generator=g) * 3
    granularity = "channel" if group_size is None else "group"
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    result = gptq_quantize(
        w, hessian_of(x), spec, block_size=block_size, act_order=act_order, static_groups=static_groups
    )
    assert torch.equal(result.q, result.q.round())
    assert spec.qmin <= float(result.q.min()) and float(result.q.max()) <= spec.qmax
    n_groups, size = spec.n_groups(features), group_size or features
    assert result.scale.shape == result.zero.shape == (out, n_groups)
    sizes = [size] * (n_groups - 1) + [features - size * (n_groups - 1)]
    assert torch.bincount(result.g_idx, minlength=n_groups).tolist() == sizes
    assert torch.equal(result.weight, dequantized(result))
    assert torch.isfinite(result.weight).all() and result.loss >= 0


def test_rank_deficient_hessian_without_damping_is_retried():
    x, w = layer(96, tokens=40)  # 40 tokens < 96 features: H has rank 40
    h = hessian_of(x)
    result = gptq_quantize(w, h, SPECS[0][1], damp_percent=0.0)
    assert result.damp > 0
    assert torch.isfinite(result.weight).all()
    assert output_error(x, w, result.weight) < output_error(x, w, rtn(w, SPECS[0][1]))


def test_indefinite_hessian_is_damped_until_positive_definite():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(48, 48))
    h = basis @ torch.diag(torch.linspace(-2.0, 5.0, 48)) @ basis.T  # negative eigenvalues down to −2
    result = gptq_quantize(torch.randn(OUT, 48), h, SPECS[0][1])
    assert result.damp > 2.0 > 0.01 * float(torch.diag(h).mean())
    assert torch.isfinite(result.weight).all()


def test_nan_hessian_raises_a_clear_error():
    h = torch.eye(16)
    h[5, 3] = h[3, 5] = float("nan")
    with pytest.raises(RuntimeError, match="not positive definite"):
        gptq_quantize(torch.randn(8, 16), h, SPECS[0][1])


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_zeroed(act_order):
    x, w = layer(96, seed=2)
    x[:, [5, 40, 95]] = 0
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    h = hessian_of(x)
    result = gptq_quantize(w, h, spec, act_order=act_order)
    assert torch.isfinite(result.weight).all()
    assert torch.equal(result.weight[:, [5, 40, 95]], torch.zeros(OUT, 3))
    assert torch.equal(h.diag()[[5, 40, 95]], torch.zeros(3))  # the caller's Hessian is left untouched
    assert output_error(x, w, result.weight) < output_error(x, w, rtn(w, spec))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=3, symmetric=True, granularity="group", group_size=32),
        QuantSpec(bits=3, symmetric=False, granularity="channel", group_size=None),
    ],
)
def test_mse_observer_beats_minmax_on_heavy_tailed_weights(spec):
    # Two outliers (±6σ) per row stretch the min/max range; clipping them costs less than coarse steps.
    x, w = layer(96, seed=4)
    g = torch.Generator().manual_seed(4)
    w.scatter_(1, torch.randint(0, 96, (OUT, 2), generator=g), 6 * torch.randn(OUT, 2, generator=g).sign())
    h = hessian_of(x)
    minmax = gptq_quantize(w, h, spec)
    mse = gptq_quantize(w, h, spec, observer="mse", observer_options={"grid": 40})
    assert output_error(x, w, mse.weight) < 0.95 * output_error(x, w, minmax.weight)
    assert torch.equal(mse.weight, dequantized(mse))


def test_rejects_bad_arguments():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(w, torch.eye(7), SPECS[0][1])
    with pytest.raises(ValueError, match="token"):
        gptq_quantize(w, h, QuantSpec(bits=8, granularity="token", group_size=None))
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, h, SPECS[0][1], block_size=0)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_rows_solve_exactly_as_each_weight_alone(observer, act_order):
    """Linears that share H (q, k, v) are solved as one stacked weight: rows are independent given H."""
    x, w = layer(80, seed=3)
    h = hessian_of(x, torch.float64)
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=24)
    parts = [w[:10].double(), w[10:40].double(), w[40:].double()]
    alone = [gptq_quantize(p, h, spec, observer=observer, act_order=act_order) for p in parts]
    stacked = gptq_quantize(torch.cat(parts), h, spec, observer=observer, act_order=act_order).split_rows([10, 30, 24])
    for a, s in zip(alone, stacked, strict=True):
        for field in ("weight", "scale", "zero", "q", "g_idx"):
            torch.testing.assert_close(getattr(s, field), getattr(a, field), rtol=1e-12, atol=1e-12)
        assert s.loss == pytest.approx(a.loss, rel=1e-9)


def tiny_llama_double(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("activations", [None, "minmax"])
def test_one_pass_equals_streamed_true_sequential(activations):
    """The one-pass schedule solves each stage on the same inputs as re-running the block stage by stage."""
    import copy

    from ptq.calibrate import calibrate
    from ptq.models.mappings import LLAMA
    from ptq.transforms.gptq import GPTQ

    reference = tiny_llama_double()
    x = torch.randint(0, 97, (7, 20), generator=torch.Generator().manual_seed(1))
    act = {} if activations is None else {"activations": QuantSpec(bits=8, granularity="tensor"),
                                          "act_observer": activations}
    models, logs = [], []
    for one_pass in (True, False):
        model = copy.deepcopy(reference)
        step = GPTQ(weight=QuantSpec(bits=3, granularity="group", group_size=32), hessian_dtype="float64",
                    true_sequential=True, one_pass=one_pass, **act)
        logs.append(calibrate(model, LLAMA, x, [step], batch_size=3, progress=False))
        models.append(model)
    assert logs[0].keys() == logs[1].keys() and len(logs[0]) == 14
    for name in logs[0]:
        assert logs[0][name]["loss"] == pytest.approx(logs[1][name]["loss"], rel=1e-6), name
    for (name, a), b in zip(models[0].named_modules(), models[1].modules(), strict=True):
        if hasattr(a, "weight_scale"):
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-9, msg=name)
            if activations is not None:
                torch.testing.assert_close(a.input_quantizer.scale, b.input_quantizer.scale, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(models[0](x).logits, models[1](x).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("features", [7, 255, 256, 301, 1024])
def test_gram_from_block_triangle_equals_the_full_product(features):
    from ptq.transforms.gptq import gram

    x = torch.randn(50, features, dtype=torch.float64, generator=torch.Generator().manual_seed(features))
    torch.testing.assert_close(gram(x), x.T @ x, rtol=1e-12, atol=1e-12)


def test_cpu_solve_leaves_the_thread_count_as_it_found_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w = layer(32)
        gptq_quantize(w, hessian_of(x), SPECS[0][1])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
