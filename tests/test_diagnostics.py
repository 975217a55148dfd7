"""Diagnostics: the statistics mean what they say, the probes measure each layer's own output error, plots exist."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ptq.calibrate import calibrate
from ptq.diagnostics import (
    Diagnostics,
    InputStats,
    block_and_role,
    kurtosis,
    outlier_ratio,
    plot_channel_magnitudes,
    short_names,
    sqnr_db,
)
from ptq.models.digits import MAPPING, DigitsMLP
from ptq.pipeline import run
from ptq.spec import QuantSpec
from ptq.transforms.rtn import RTN
from ptq.transforms.smoothquant import SmoothQuant


def test_kurtosis_of_known_distributions():
    torch.manual_seed(0)
    gaussian, uniform = torch.randn(400_000).double(), torch.rand(400_000).double()
    for x, expected in ((gaussian, 3.0), (uniform, 1.8)):
        sums = [x.numel(), x.sum(), x.pow(2).sum(), x.pow(3).sum(), x.pow(4).sum()]
        assert kurtosis(*map(float, sums)) == pytest.approx(expected, rel=0.02)


def test_outlier_ratio_and_sqnr():
    assert outlier_ratio(torch.ones(10)) == 1.0
    magnitudes = torch.ones(11)
    magnitudes[3] = 100.0
    assert outlier_ratio(magnitudes) == 100.0
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0) and sqnr_db(1.0, 0.0) == math.inf


def test_input_stats_over_batches_equal_stats_of_all_tokens():
    torch.manual_seed(0)
    batches = [torch.randn(3, 5, 7) * torch.arange(1, 8) for _ in range(4)]
    stats = InputStats()
    for batch in batches:
        stats.update(batch)
    everything = torch.cat([b.reshape(-1, 7) for b in batches]).double()
    assert torch.equal(stats.channel_absmax, everything.abs().amax(dim=0).float())
    centred = everything - everything.mean()
    assert stats.kurtosis() == pytest.approx(float(centred.pow(4).mean() / centred.pow(2).mean() ** 2), rel=1e-9)


def test_block_and_role_split_a_layer_name_at_its_block_index():
    assert block_and_role("model.layers.12.mlp.up_proj") == (12, "mlp.up_proj")
    assert block_and_role("3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert block_and_role("lm_head") is None


def test_short_names_drop_the_shared_prefix():
    assert short_names(["model.layers.0.mlp.up", "model.layers.1.attn.q"]) == ["0.mlp.up", "1.attn.q"]
    assert short_names(["only.one"]) == ["only.one"]


def diagnosed(bits: int, steps_before: list | None = None, samples: torch.Tensor | None = None
              ) -> tuple[Diagnostics, dict, DigitsMLP, DigitsMLP, torch.Tensor]:
    """A small MLP calibrated with ``steps_before`` and RTN at ``bits`` under the probes (batches of 8)."""
    torch.manual_seed(0)
    model = DigitsMLP(features=16, hidden=(32, 24), classes=8)
    reference = copy.deepcopy(model)
    probe = Diagnostics(batches=2)
    rtn = RTN(weight=QuantSpec(bits=bits, granularity="channel"))
    samples = torch.rand(64, 16) if samples is None else samples
    logs = calibrate(model, MAPPING, samples, probe.wrap([*(steps_before or []), rtn]), batch_size=8,
                     progress=False)
    return probe, logs, model, reference, samples


def test_output_error_is_the_layer_own_error_on_its_calibration_inputs():
    _, logs, model, reference, samples = diagnosed(bits=4)
    x = samples[:16]  # the first two batches of 8
    with torch.no_grad():
        expected = (model.layers[0].fc1(x) - reference.layers[0].fc1(x)).pow(2).mean()
    assert logs["layers.0.fc1"]["output_mse"] == pytest.approx(float(expected), rel=1e-5)
    assert {"output_sqnr_db", "act_outlier_ratio", "act_kurtosis", "weight_sqnr_db"} <= set(logs["layers.0.fc2"])


def test_more_bits_give_higher_output_sqnr():
    low, high = diagnosed(bits=3)[1], diagnosed(bits=8)[1]
    assert all(high[name]["output_sqnr_db"] > low[name]["output_sqnr_db"] + 20 for name in low)


def test_rescaled_statistics_after_smoothquant_with_alpha_one_are_flat():
    """α = 1 divides each channel by its own max |x|: every live channel then peaks at 1 (SmoothQuant eq. 4)."""
    smooth = SmoothQuant(alpha=1.0, include_linear_prev=True)
    probe, logs, *_ = diagnosed(bits=8, steps_before=[smooth])
    after = probe.rescaled["layers.0.fc2"].channel_absmax
    assert torch.allclose(after[after > 0], torch.ones(()), rtol=1e-4)
    assert logs["layers.0.fc2"]["act_outlier_ratio_rescaled"] == pytest.approx(1.0, rel=1e-4)
    assert logs["layers.0.fc2"]["act_outlier_ratio"] > 1.0


def test_channel_figure_shows_the_strongest_outliers_among_the_inputs_the_rescalers_changed():
    """fc1 reads the pixels (nothing before it takes a scale): its outlier channel is the strongest, but the
    figure before and after SmoothQuant must show an input that SmoothQuant changed."""
    samples = torch.rand(64, 16)
    samples[:, 3] *= 1000.0
    probe, *_ = diagnosed(bits=8, steps_before=[SmoothQuant(alpha=0.5, include_linear_prev=True)], samples=samples)
    assert max(probe.raw, key=lambda name: probe.raw[name].outlier_ratio()) == "layers.0.fc1"
    assert probe.channel_plot_layer() in {"layers.0.fc2", "layers.0.fc3"}
    plain, *_ = diagnosed(bits=8, samples=samples)
    assert plain.channel_plot_layer() == "layers.0.fc1"


def test_write_plots_draws_three_figures(tmp_path):
    probe, logs, *_ = diagnosed(bits=4, steps_before=[SmoothQuant(alpha=0.5, include_linear_prev=True)])
    images = probe.write_plots(logs, tmp_path)
    assert set(images) == {"diagnostics/layer_sqnr", "diagnostics/activation_channels",
                           "diagnostics/weight_histogram"}
    for path in images.values():
        assert path.parent == tmp_path and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_channel_magnitudes(np.array([1.0, 0.0, 5.0]), None, "x", "", tmp_path / "c.png").is_file()


def test_pipeline_with_diagnostics_logs_columns_and_images(tiny_config, tmp_path):
    results = run(tiny_config("method=smoothquant", "diagnostics=true", "logger=wandb", "logger.mode=offline"),
                  tmp_path)
    row = next(iter(results["layers"].values()))
    assert {"output_mse", "output_sqnr_db", "act_outlier_ratio", "act_kurtosis", "act_outlier_ratio_rescaled"
            } <= set(row)
    assert all(len(r) == len(row) for r in results["layers"].values())
    for name in ("layer_sqnr", "activation_channels", "weight_histogram"):
        assert (tmp_path / f"{name}.png").is_file()
    assert len(list((tmp_path / "wandb").glob("offline-run-*/files/media/images/diagnostics/*.png"))) == 3


def test_pipeline_without_diagnostics_writes_no_plots(tiny_config, tmp_path):
    results = run(tiny_config(), tmp_path)
    assert not list(tmp_path.glob("*.png"))
    assert "output_sqnr_db" not in next(iter(results["layers"].values()))
