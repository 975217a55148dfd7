"""Mixed precision: the allocation keeps the budget and raises the most sensitive layers; it beats uniform bits."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

from ptq.affine import fake_quantize
from ptq.calibrate import calibrate
from ptq.models.digits import MAPPING, DigitsMLP
from ptq.observers import build_observer
from ptq.pipeline import run
from ptq.spec import QuantSpec
from ptq.transforms.mixed_precision import MixedPrecision, allocate, average_bits, input_second_moments, proxy_error
from ptq.transforms.rtn import RTN

W3 = QuantSpec(bits=3, symmetric=True, granularity="channel")


def two_widths(gain: dict[str, float], low: int = 3, high: int = 8) -> dict[str, dict[int, float]]:
    """Proxy errors at two widths whose difference is ``gain``."""
    return {name: {low: g, high: 0.0} for name, g in gain.items()}


@pytest.mark.parametrize("seed", range(20))
def test_allocation_respects_the_budget_and_leaves_no_affordable_improvement(seed):
    rng = random.Random(seed)
    params = {f"l{i}": rng.choice([64, 256, 1024, 4096]) for i in range(rng.randint(1, 12))}
    errors = {name: dict(zip(range(3, 9), sorted((rng.uniform(0, 10) for _ in range(6)), reverse=True), strict=True))
              for name in params}
    avg = rng.uniform(3.0, 8.0)
    bits = allocate(params, errors, avg)
    assert all(3 <= b <= 8 for b in bits.values())
    assert average_bits(params, bits) <= avg + 1e-9
    spare = (avg - average_bits(params, bits)) * sum(params.values())
    assert all(params[n] * (w - bits[n]) > spare + 1e-6 or e >= errors[n][bits[n]]
               for n in params for w, e in errors[n].items() if w > bits[n])


def test_the_most_sensitive_layers_get_the_high_width():
    params = dict.fromkeys("abcdef", 100)
    gain = {"a": 1.0, "b": 50.0, "c": 3.0, "d": 40.0, "e": 0.5, "f": 2.0}
    bits = allocate(params, two_widths(gain, 4, 8), 4 + 4 * 2 / 6)  # room for exactly two layers
    assert {n for n, b in bits.items() if b == 8} == {"b", "d"}


def test_gain_is_weighed_per_stored_bit():
    bits = allocate({"big": 1000, "small": 100}, two_widths({"big": 50.0, "small": 10.0}), 3 + 5 * 1000 / 1100)
    assert bits == {"big": 3, "small": 8}  # 10 / 100 per parameter beats 50 / 1000


def test_intermediate_widths_spread_the_budget_where_error_falls_fastest():
    """Error ÷4 per bit (6 dB/bit): a layer 4⁴× more sensitive than three others gets 4 bits more than they do."""
    params = dict.fromkeys("abcd", 100)
    scales = {"a": 4.0**4, "b": 1.0, "c": 1.0, "d": 1.0}
    errors = {name: {b: scales[name] * 4.0**-b for b in range(2, 9)} for name in params}
    bits = allocate(params, errors, 4.0)
    assert bits == {"a": 7, "b": 3, "c": 3, "d": 3}


def test_proxy_is_the_output_error_for_uncorrelated_inputs():
    """Σ_j E[x_j²] ‖ΔW_:j‖² = E‖ΔW x‖² when the input channels are uncorrelated (the diagonal Hessian is exact)."""
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    x = torch.randn(200_000, 40) * torch.linspace(0.1, 3.0, 40)
    scale, zero = build_observer("minmax", W3)(weight)
    delta = weight - fake_quantize(weight, scale, zero, W3)
    measured = (x @ delta.T).pow(2).sum(dim=1).mean()
    assert proxy_error(weight, x.pow(2).mean(dim=0), W3) == pytest.approx(float(measured), rel=0.03)


def test_relative_sensitivity_does_not_depend_on_the_scale_of_a_layer():
    """Scaling a layer's inputs by c scales its output error by c² but leaves its noise-to-signal ratio alone."""
    torch.manual_seed(0)
    model = DigitsMLP(features=16, hidden=(32, 24), classes=8)
    samples = torch.rand(64, 16)
    sensitivities = {}
    for c, kind in itertools.product((1.0, 10.0), ("output", "relative")):
        step = MixedPrecision(weight=W3, high_bits=5, avg_bits=4.0, sensitivity=kind)
        step.prepare(copy.deepcopy(model), MAPPING, samples * c, 16, "cpu")
        sensitivities[c, kind] = step.errors_of["layers.0.fc1"]
    for bits in range(3, 6):
        assert sensitivities[10.0, "output"][bits] == pytest.approx(100 * sensitivities[1.0, "output"][bits], rel=1e-4)
        assert sensitivities[10.0, "relative"][bits] == pytest.approx(sensitivities[1.0, "relative"][bits], rel=1e-4)


def sensitive_mlp() -> DigitsMLP:
    """fc2 reads a dead input channel whose weights are 50× the rest: they set every row's range (per-channel
    grid) but never touch the output, so fc2 rounds to nothing at low widths: one very sensitive layer."""
    torch.manual_seed(0)
    model = DigitsMLP(features=64, hidden=(32, 32), classes=32)  # 2048 + 1024 + 1024 weights
    block = model.layers[0]
    block.fc1.weight.data[0] = 0.0
    block.fc1.bias.data[0] = -1.0  # ReLU(fc1)_0 = 0 always
    block.fc2.weight.data[:, 0] *= 50.0
    return model


@torch.no_grad()
def output_error(model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    return float((model(x) - reference(x)).pow(2).mean())


def test_mixed_beats_uniform_at_the_same_average_width():
    model, samples, x = sensitive_mlp(), torch.rand(256, 64), torch.rand(512, 64)
    step = MixedPrecision(weight=W3, high_bits=7, avg_bits=4.0)
    mixed = copy.deepcopy(model)
    step.prepare(mixed, MAPPING, samples, 32, "cpu")
    logs = calibrate(mixed, MAPPING, samples, [step], progress=False)
    uniform = copy.deepcopy(model)
    calibrate(uniform, MAPPING, samples, [RTN(weight=QuantSpec(bits=4, granularity="channel"))], progress=False)
    assert logs["layers.0.fc2"]["bits"] == max(row["bits"] for row in logs.values()) > 4
    assert max(step.errors_of, key=lambda n: step.errors_of[n][3] - step.errors_of[n][7]) == "layers.0.fc2"
    assert output_error(mixed, model, x) < output_error(uniform, model, x) / 2


def test_second_moments_come_from_a_full_precision_pass():
    model, samples = sensitive_mlp(), torch.rand(40, 64)
    moments = input_second_moments(model, MAPPING, samples, 16, "cpu")
    block = model.layers[0]
    hidden = torch.relu(block.fc1(samples))
    assert torch.allclose(moments["layers.0.fc1"], samples.pow(2).mean(dim=0))
    assert torch.allclose(moments["layers.0.fc2"], hidden.pow(2).mean(dim=0), rtol=1e-5)
    assert moments["layers.0.fc2"][0] == 0


def test_apply_without_prepare_and_bad_options_fail_clearly():
    step = MixedPrecision(weight=W3, high_bits=8, avg_bits=4.0)
    with pytest.raises(RuntimeError, match="prepare"):
        calibrate(DigitsMLP(8, (8, 8), 4), MAPPING, torch.rand(4, 8), [step], progress=False)
    with pytest.raises(ValueError, match="avg_bits"):
        MixedPrecision(weight=W3, high_bits=8, avg_bits=2.5)
    with pytest.raises(ValueError, match="high_bits"):
        MixedPrecision(weight=W3, high_bits=3)
    with pytest.raises(ValueError, match="quantizer"):
        MixedPrecision(weight=W3, quantizer="awq")
    with pytest.raises(ValueError, match="sensitivity"):
        MixedPrecision(weight=W3, sensitivity="fisher")


def test_pipeline_mixed_with_gptq_logs_the_chosen_widths(tiny_config, tmp_path):
    results = run(tiny_config("method=mixed", "bits=3", "group_size=32", "method.steps.0.avg_bits=4",
                              "method.steps.0.quantizer=gptq"), tmp_path)
    layers = results["layers"]
    widths = {row["bits"] for row in layers.values()}
    assert widths <= set(range(3, 9)) and len(widths) > 1
    assert all(row["loss"] is not None and row["sensitivity"] >= 0 for row in layers.values())
    # 3 + 16/32 bits of scales at the low width; the nominal average is at most 4, so storage is at most 4.5
    assert 3.5 < results["size"]["linear_bits_per_weight"] <= 4.5 + 1e-6
