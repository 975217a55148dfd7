"""Observer behaviour: ranges shrink where they should and the MSE search never loses to min/max."""

import pytest
import torch

from ptq.affine import fake_quantize
from ptq.observers import OBSERVERS, build_observer
from ptq.spec import QuantSpec

SPECS = [
    QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32),
    QuantSpec(bits=3, symmetric=False, granularity="group", group_size=48),
    QuantSpec(bits=4, symmetric=False, granularity="channel"),
    QuantSpec(bits=8, symmetric=True, granularity="tensor"),
    QuantSpec(bits=8, symmetric=False, granularity="token"),
]


def heavy_tailed(rows=16, cols=200, seed=0):
    """Mostly small values with a few large ones, like LLM weights and activations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g).pow(4) * 5


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_every_observer_works_for_every_granularity(name, spec):
    x = heavy_tailed()
    scale, zero = build_observer(name, spec)(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    out = fake_quantize(x, scale, zero, spec)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_percentile_range_is_inside_minmax_range(spec):
    x = heavy_tailed()
    minmax_scale, _ = build_observer("minmax", spec)(x)
    pct_scale, _ = build_observer("percentile", spec, percentile=99.0)(x)
    assert torch.all(pct_scale <= minmax_scale * (1 + 1e-6))
    assert torch.any(pct_scale < minmax_scale)


@pytest.mark.parametrize("spec", SPECS[:4], ids=str)
def test_mse_error_is_at_most_minmax_error(spec):
    x = heavy_tailed(seed=3)
    errors = {}
    for name in ("minmax", "mse"):
        scale, zero = build_observer(name, spec, **({"norm": 2.0} if name == "mse" else {}))(x)
        errors[name] = (fake_quantize(x, scale, zero, spec) - x).pow(2).sum().item()
    assert errors["mse"] <= errors["minmax"]
    if spec.bits < 8:  # at 8 bits min/max is already close to optimal
        assert errors["mse"] < 0.99 * errors["minmax"]


def test_minmax_accumulates_and_moving_minmax_averages():
    spec = QuantSpec(bits=8, granularity="tensor")
    small, large = torch.ones(4, 4), torch.full((4, 4), 10.0)
    minmax, moving = build_observer("minmax", spec), build_observer("moving_minmax", spec, momentum=0.5)
    for x in (small, large):
        minmax.update(x)
        moving.update(x)
    assert minmax.qparams()[0].item() == pytest.approx(10.0 / 127.5)
    assert moving.qparams()[0].item() == pytest.approx(5.5 / 127.5)


@pytest.mark.parametrize("name,options", [("percentile", {"percentile": 150}), ("mse", {"grid": 0}),
                                          ("moving_minmax", {"momentum": 1.5})])
def test_bad_observer_options_are_rejected(name, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        build_observer(name, QuantSpec(), **options)
