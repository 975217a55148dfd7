"""Properties of affine quantization that make it right, on random tensors of random shapes and specs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptq.affine import dequantize, expand, fake_quantize, minmax_qparams, pack_int4, quantize, slots, unpack_int4
from ptq.spec import QuantSpec

specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", "group", "token"]),
    group_size=st.sampled_from([1, 3, 16, 32, 64, 128]),
)


@st.composite
def tensors(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 200))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=200, deadline=None)
@given(tensors(), specs)
def test_error_is_at_most_half_a_step_inside_the_range(x, spec):
    scale, zero = minmax_qparams(x, spec)
    error = (fake_quantize(x, scale, zero, spec) - x).abs()
    step = expand(scale, spec, x.shape[-1]).expand_as(x)
    assert torch.all(error <= step / 2 * (1 + 1e-5) + 1e-6 * x.abs() + 1e-7)


@settings(max_examples=200, deadline=None)
@given(tensors(), specs)
def test_quantize_dequantize_quantize_is_quantize(x, spec):
    scale, zero = minmax_qparams(x, spec)
    q = quantize(x, scale, zero, spec)
    assert torch.equal(quantize(dequantize(q, scale, zero, spec), scale, zero, spec), q)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    assert torch.equal(q, q.round())


@settings(max_examples=100, deadline=None)
@given(tensors(), specs.filter(lambda s: not s.symmetric))
def test_zero_is_exactly_representable_with_asymmetric_specs(x, spec):
    scale, zero = minmax_qparams(x, spec)
    zeros = torch.zeros_like(x)
    assert torch.equal(fake_quantize(zeros, scale, zero, spec), zeros)
    assert torch.equal(zero, zero.round())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.sampled_from([32, 64, 128]))
def test_ragged_last_group_gets_its_own_range(features, group_size):
    spec = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=group_size)
    x = torch.rand(3, features) * 0.01
    x[:, -1] = 100.0  # a huge value in the last (possibly short) group only
    scale, _ = minmax_qparams(x, spec)
    assert scale.shape == (3, spec.n_groups(features))
    if spec.n_groups(features) > 1:
        assert torch.all(scale[:, :-1] < 1.0)  # earlier groups are not widened by the last one
    assert torch.allclose(scale[:, -1], torch.full((3,), 100.0 / ((spec.qmax - spec.qmin) / 2)))


def test_slots_pad_ragged_group_without_changing_min_max():
    x = torch.arange(10.0).reshape(1, 10)
    view = slots(x, QuantSpec(bits=4, granularity="group", group_size=4))
    assert view.shape == (1, 3, 4)
    assert view[0, 2].tolist() == [8.0, 9.0, 9.0, 9.0]


def test_symmetric_grid_spans_all_levels():
    # the seeds' absmax example x = [-3, 1, 2, 4] at int8, on a grid of 256 levels: s = 4 / 127.5
    x = torch.tensor([[-3.0, 1.0, 2.0, 4.0]])
    spec = QuantSpec(bits=8, symmetric=True, granularity="tensor")
    scale, zero = minmax_qparams(x, spec)
    assert scale.item() == pytest.approx(4 / 127.5) and zero.item() == 0
    assert quantize(x, scale, zero, spec).tolist() == [[-96.0, 32.0, 64.0, 127.0]]
    three_bit = QuantSpec(bits=3, symmetric=True, granularity="tensor")
    levels = quantize(torch.linspace(-1.2, 1.2, 101).unsqueeze(0), *minmax_qparams(torch.tensor([[1.0]]), three_bit),
                      three_bit).unique()
    assert levels.tolist() == [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]


def test_pack_int4_roundtrip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert torch.equal(unpack_int4(packed), q)


def test_quant_spec_rejects_bad_values():
    for kwargs in ({"bits": 1}, {"bits": 9}, {"granularity": "row"}, {"group_size": 0}):
        with pytest.raises(ValueError):
            QuantSpec(**kwargs)
