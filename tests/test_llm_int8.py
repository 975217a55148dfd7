"""LLM.int8(): without outliers it is W8A8 exactly; with outlier features it is far more accurate than W8A8."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptq.affine import fake_quantize, quantize_dynamic
from ptq.calibrate import calibrate
from ptq.models.digits import MAPPING, DigitsMLP
from ptq.observers import build_observer
from ptq.pipeline import run
from ptq.spec import QuantSpec
from ptq.transforms import build_step
from ptq.transforms.llm_int8 import LLMInt8, LLMInt8Linear, outlier_columns
from ptq.transforms.rtn import RTN

W8 = QuantSpec(bits=8, symmetric=True, granularity="channel")
A8 = QuantSpec(bits=8, symmetric=True, granularity="token")
W8_ZEROPOINT = QuantSpec(bits=8, symmetric=False, granularity="channel")
A8_ZEROPOINT = QuantSpec(bits=8, symmetric=False, granularity="token")
GRIDS = {"absmax": (W8, A8), "zeropoint": (W8_ZEROPOINT, A8_ZEROPOINT)}


def int8_layer(linear: nn.Linear, threshold: float = 6.0) -> LLMInt8Linear:
    scale, zero = build_observer("minmax", W8)(linear.weight.data)
    return LLMInt8Linear(linear, fake_quantize(linear.weight.data, scale, zero, W8), W8, A8, threshold)


def w8a8(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    scale, zero = build_observer("minmax", W8)(linear.weight.data)
    return F.linear(quantize_dynamic(x, A8), fake_quantize(linear.weight.data, scale, zero, W8), linear.bias)


def test_outlier_columns_are_those_with_any_large_element():
    x = torch.zeros(2, 3, 5)
    x[1, 2, 1], x[0, 0, 4] = 7.0, -6.5
    x[1, 1, 3] = 6.0  # not above the threshold
    assert outlier_columns(x, 6.0).tolist() == [False, True, False, False, True]


@pytest.mark.parametrize("grid", GRIDS)
def test_without_outliers_the_step_equals_w8a8_round_to_nearest_on_the_same_grid(grid):
    weight, activations = GRIDS[grid]
    torch.manual_seed(0)
    model = DigitsMLP(features=16, hidden=(32, 24), classes=8)
    samples = torch.rand(32, 16)
    int8, rtn = copy.deepcopy(model), copy.deepcopy(model)
    calibrate(int8, MAPPING, samples, [LLMInt8(weight=weight, activations=activations)], progress=False)
    calibrate(rtn, MAPPING, samples, [RTN(weight=weight, activations=activations)], progress=False)
    x = torch.rand(64, 16)
    assert torch.equal(int8(x), rtn(x))
    assert all(int(m.outlier_hits.sum()) == 0 for m in int8.modules() if isinstance(m, LLMInt8Linear))


def test_outlier_features_are_multiplied_in_full_precision():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    x = torch.randn(4, 32, 256)
    columns = torch.tensor([7, 100, 201])
    x[..., columns] *= 40.0  # systematic outlier features, as in LLM.int8() §4
    reference = linear(x)
    layer = int8_layer(linear)
    error_int8 = (layer(x) - reference).pow(2).mean()
    error_w8a8 = (w8a8(linear, x) - reference).pow(2).mean()
    assert error_int8 < error_w8a8 / 100
    assert set(layer.outlier_hits.nonzero().flatten().tolist()) >= set(columns.tolist())


def test_outlier_part_is_exact_and_the_rest_is_quantized():
    """Y = X_O W_Oᵀ + Q(X_R) Ŵ_Rᵀ: zeroing the regular columns leaves only the exact full-precision product."""
    torch.manual_seed(1)
    linear = nn.Linear(32, 16, bias=False)
    x = torch.zeros(8, 32)
    x[:, 3] = 50.0 * torch.randn(8).sign()
    assert torch.allclose(int8_layer(linear)(x), linear(x), atol=1e-5)


def test_zeropoint_grid_halves_the_step_on_non_negative_tokens():
    """§2.1: absmax spends half of its 255 levels on the sign a non-negative token never takes; zeropoint does not."""
    torch.manual_seed(2)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.rand(16, 64) * 4.0  # non-negative, below the threshold: every column is regular
    errors = {}
    for grid, (weight, activations) in GRIDS.items():
        layer = LLMInt8Linear(linear, linear.weight.data, weight, activations, 6.0)  # only X is quantized
        errors[grid] = (layer(x) - linear(x)).pow(2).mean()
    assert errors["zeropoint"] < errors["absmax"] / 3  # half the step: about a quarter of the squared error


def test_the_step_is_built_from_config_and_rejects_static_activations():
    step = build_step({"name": "llm_int8", "weight": {"bits": 8, "granularity": "channel"},
                       "activations": {"bits": 8, "granularity": "token"}, "threshold": 4.0},
                      {"name": "minmax"}, 0)
    assert isinstance(step, LLMInt8) and step.threshold == 4.0 and not step.needs_data
    with pytest.raises(ValueError, match="activations"):
        build_step({"name": "llm_int8", "weight": {"bits": 8, "granularity": "channel"},
                    "activations": {"bits": 8, "granularity": "tensor", "observer": {"name": "minmax"}}},
                   {"name": "minmax"}, 0)
    with pytest.raises(ValueError, match="threshold"):
        LLMInt8(weight=W8, activations=A8, threshold=0.0)


def test_pipeline_llm_int8_is_close_to_baseline_and_counted_as_int8(tiny_config, tmp_path):
    results = run(tiny_config("method=llm_int8"), tmp_path)
    metrics = results["metrics"]
    assert metrics["quantized"]["perplexity"] == pytest.approx(metrics["baseline"]["perplexity"], rel=0.02)
    assert 8.0 < results["size"]["linear_bits_per_weight"] < 9.0
    assert {row["bits"] for row in results["layers"].values()} == {8}
