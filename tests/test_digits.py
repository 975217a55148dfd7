"""The digits classifier: offline data, a seeded MLP that learns, and the same pipeline scored by accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from ptq.config import ConfigError, validate
from ptq.models.digits import DigitsMLP, classification_metrics, load_digits_split, train_mlp
from ptq.pipeline import run

DIGITS = ["model=digits_mlp", "logger=none", "progress=false", "method=rtn", "bits=8", "group_size=null"]


@pytest.fixture(scope="module")
def split():
    return load_digits_split(seed=0)


def test_split_is_seeded_disjoint_and_scaled(split):
    again, other = load_digits_split(seed=0), load_digits_split(seed=1)
    assert torch.equal(split.test_x, again.test_x) and not torch.equal(split.test_x, other.test_x)
    assert (len(split.train_x), len(split.test_x)) == (1258, 539)
    assert split.train_x.min() >= 0 and split.train_x.max() <= 1
    train_rows = {tuple(row.tolist()) for row in split.train_x}
    assert sum(tuple(row.tolist()) in train_rows for row in split.test_x) < 10  # a few duplicate images exist


def test_training_is_deterministic_and_learns(split):
    first, second = train_mlp(split, seed=0, epochs=2), train_mlp(split, seed=0, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert classification_metrics(train_mlp(split, seed=0), split.test_x, split.test_y)["accuracy"] > 0.95


def test_metrics_accumulated_over_batches_equal_one_pass_over_the_test_set(split):
    model = train_mlp(split, seed=0, epochs=2)
    metrics = classification_metrics(model, split.test_x, split.test_y, batch_size=100)  # 539: a ragged last batch
    logits = model(split.test_x)
    assert metrics["accuracy"] == int((logits.argmax(dim=-1) == split.test_y).sum()) / len(split.test_y)
    assert metrics["nll"] == pytest.approx(float(F.cross_entropy(logits, split.test_y)), rel=1e-5)


def test_one_block_model_for_the_engine():
    model = DigitsMLP()
    assert len(model.layers) == 1 and model(torch.rand(3, 64), use_cache=False).shape == (3, 10)


def test_int8_per_channel_and_per_tensor_through_the_pipeline(tmp_path):
    channel = run(compose_config(DIGITS, tmp_path), tmp_path / "channel")
    tensor = run(compose_config([*DIGITS, "method.steps.0.weight.granularity=tensor"], tmp_path), tmp_path / "tensor")
    assert tensor["baseline_from_cache"] and channel["metrics"]["baseline"] == tensor["metrics"]["baseline"]
    assert set(channel["metrics"]["quantized"]) == {"accuracy", "nll"} and channel["eval_windows"] == 539
    assert channel["metrics"]["quantized"]["accuracy"] == pytest.approx(channel["metrics"]["baseline"]["accuracy"],
                                                                        abs=0.01)
    assert {row["group_size"] for row in tensor["layers"].values()} == {"tensor"}
    for name, row in channel["layers"].items():
        assert row["group_size"] == "channel" and row["weight_mse"] <= tensor["layers"][name]["weight_mse"]


def test_classifier_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.kind"):
        validate(compose_config([*DIGITS, "model.kind=regressor"], tmp_path))
    with pytest.raises(ConfigError, match="eval.tasks"):
        run(compose_config([*DIGITS, "eval.tasks=[pydoc_choice]"], tmp_path), tmp_path)
