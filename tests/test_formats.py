"""Float grids (ptq.formats): element rounding as the formats define it, their scales, and the quantizers on them."""

from __future__ import annotations

import pytest
import torch

from ptq.affine import dequantize, fake_quantize, minmax_qparams, quantize
from ptq.formats import E2M1, E4M3, E5M2, FORMATS, e8m0_scale, nvfp4_block_scale, nvfp4_tensor_scale
from ptq.spec import QuantSpec
from ptq.transforms.gptq import gptq_quantize

TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
BLOCK = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}


def spec_of(name: str, **fields) -> QuantSpec:
    grid = FORMATS[name]
    layout = {"granularity": "group", "group_size": grid.group_size} if grid.group_size else \
        {"granularity": "channel"}
    return QuantSpec(bits=grid.bits, format=name, **{**layout, **fields})


@pytest.mark.parametrize("elements", [E4M3, E5M2])
def test_every_fp8_value_round_trips_and_rounding_equals_torch(elements):
    dtype = TORCH_FP8[elements.name]
    every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    every = every[torch.isfinite(every)]
    assert torch.equal(elements.round(every), every)
    assert elements.values.tolist() == sorted(set(every.abs().tolist()))
    x = (torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * elements.max_value / 8)
    x = x.clamp(-elements.max_value, elements.max_value)
    assert torch.equal(elements.round(x), x.to(dtype).float())


def test_e2m1_has_the_eight_magnitudes_of_the_ocp_table():
    assert E2M1.values.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    signed = torch.cat([E2M1.values, -E2M1.values])
    assert torch.equal(E2M1.round(signed), signed)


@pytest.mark.parametrize("elements", [E2M1, E4M3, E5M2])
def test_midpoints_round_to_the_even_mantissa_and_values_saturate(elements):
    values = elements.values
    mid = (values[1:] + values[:-1]) / 2
    rounded = elements.round(mid)
    lower_is_even = torch.tensor([_mantissa_even(v, elements) for v in values[:-1].tolist()])
    assert torch.equal(rounded, torch.where(lower_is_even, values[:-1], values[1:]))
    assert elements.round(torch.tensor([1e30, -1e30])).tolist() == [elements.max_value, -elements.max_value]


def _mantissa_even(value: float, elements) -> bool:
    """Whether ``value``'s last mantissa bit is 0 (its index in the sorted value list is even)."""
    return elements.values.tolist().index(value) % 2 == 0


def test_e8m0_scale_is_the_ocp_shared_exponent():
    # OCP MX v1.0 §6.3: X = 2^(floor(log2 amax) − emax_elem); emax_elem is 2 for E2M1 and 8 for E4M3.
    absmax = torch.tensor([6.0, 7.9, 8.0, 0.3, 448.0])
    assert e8m0_scale(absmax, E2M1).tolist() == [1.0, 1.0, 2.0, 2.0**-4, 64.0]
    assert e8m0_scale(absmax, E4M3).tolist() == [2.0**-6, 2.0**-6, 2.0**-5, 2.0**-10, 1.0]
    assert e8m0_scale(torch.tensor([0.0]), E2M1).item() == 2.0**-127


def test_nvfp4_two_level_scale_worked_example():
    # A tensor whose largest |w| is 2688 = 448 · 6 has tensor scale g = 1. A block with max |x| = 10 wants scale
    # 10 / 6 = 1.667, stored in E4M3 as 1.625 (1.101b: 1.625 and 1.75 are the neighbours; 1.667 is nearer 1.625),
    # and its largest element 10 / 1.625 = 6.15 saturates to 6 (→ 9.75); 2.5 / 1.625 = 1.54 → 1.5 (→ 2.4375).
    block = torch.tensor([[10.0, 2.5, -0.8, 0.0] + [0.0] * 12])
    g = nvfp4_tensor_scale(torch.tensor(2688.0))
    assert g.item() == 1.0
    scale = nvfp4_block_scale(block.abs().amax(dim=-1, keepdim=True), g)
    assert scale.item() == 1.625
    spec = spec_of("nvfp4")
    q = quantize(block, scale, torch.zeros_like(scale), spec)
    assert q[0, :4].tolist() == [6.0, 1.5, -0.5, 0.0]
    assert dequantize(q, scale, torch.zeros_like(scale), spec)[0, :4].tolist() == [9.75, 2.4375, -0.8125, 0.0]
    # A smaller tensor range scales every block scale into E4M3 under g = max|W| / 2688.
    small = block / 1000
    g = nvfp4_tensor_scale(small.abs().amax())
    stored = nvfp4_block_scale(small.abs().amax(dim=-1, keepdim=True), g) / g
    assert stored.item() == pytest.approx(448.0, rel=1e-6)  # the tensor's largest block: E4M3's largest scale


@pytest.mark.parametrize("name", list(BLOCK) + ["fp8_e4m3", "fp8_e5m2"])
def test_quantizing_a_representable_tensor_is_the_identity(name):
    spec = spec_of(name)
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(1))
    scale, zero = minmax_qparams(x, spec)
    once = fake_quantize(x, scale, zero, spec)
    assert torch.equal(fake_quantize(once, scale, zero, spec), once)
    q = quantize(x, scale, zero, spec)
    assert torch.equal(spec.grid.elements.round(q), q)  # codes are elements of the grid
    assert q.abs().max() <= spec.grid.elements.max_value


def test_mx_scales_are_powers_of_two_and_nvfp4_scales_are_e4m3_under_the_tensor_scale():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    scale, _ = minmax_qparams(x, spec_of("mxfp4"))
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    scale, _ = minmax_qparams(x, spec_of("nvfp4"))
    g = nvfp4_tensor_scale(x.abs().amax())
    assert torch.equal(E4M3.round(scale / g) * g, scale)


@pytest.mark.parametrize(("fields", "message"), [
    ({"bits": 3, "format": "nvfp4", "granularity": "group", "group_size": 16}, "bits=3: format=nvfp4 has 4-bit"),
    ({"bits": 4, "format": "mxfp4", "granularity": "group", "group_size": 64},
     "group_size=64: format=mxfp4 shares one scale per 32 elements"),
    ({"bits": 8, "format": "fp8_e4m3", "symmetric": False, "granularity": "channel"},
     "symmetric=False: format=fp8_e4m3 is a sign-magnitude grid"),
    ({"bits": 8, "format": "fp4"}, "format='fp4': allowed are int, fp8_e4m3"),
])
def test_bad_format_combinations_fail_in_one_line(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**fields)


def test_bits_per_weight_counts_the_format_scales():
    assert spec_of("mxfp4").bits_per_weight(576) == 4.25
    assert spec_of("nvfp4").bits_per_weight(576) == 4.5
    assert QuantSpec(bits=4, group_size=32).bits_per_weight(576) == 4.5  # an fp16 scale per 32


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "fp8_e4m3"])
def test_gptq_on_a_float_grid_beats_rtn_on_the_same_grid(name):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator) / 8
    weight = torch.randn(48, 64, generator=generator)
    spec = spec_of(name)
    hessian = 2 * x.T @ x / len(x)
    result = gptq_quantize(weight, hessian, spec)
    assert torch.equal(spec.grid.elements.round(result.q), result.q)
    rtn = fake_quantize(weight, *minmax_qparams(weight, spec), spec)
    def output_error(w: torch.Tensor) -> float:
        return (x @ (w - weight).T).pow(2).mean().item()
    assert output_error(result.weight) < 0.9 * output_error(rtn)


def test_gptq_keeps_one_nvfp4_tensor_scale_for_every_group():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 64, generator=generator)
    x = torch.randn(256, 64, generator=generator)
    result = gptq_quantize(weight, 2 * x.T @ x / 256, spec_of("nvfp4"))
    g = nvfp4_tensor_scale(weight.abs().amax())
    assert torch.equal(E4M3.round(result.scale / g) * g, result.scale)  # stored E4M3 value · g


@pytest.mark.parametrize(("overrides", "message"), [
    (["format=nvfp4", "bits=3", "group_size=16"], r"^format=nvfp4: method.steps\[0\].weight.bits=3: format=nvfp4"),
    (["format=mxfp4", "bits=4", "group_size=64"], r"^format=mxfp4: method.steps\[0\].weight.group_size=64"),
    (["format=mxfp4", "bits=4", "group_size=32", "method=awq"], r"^format=mxfp4: .*symmetric=False"),
    (["format=fp8_e4m3", "bits=8", "backend=torch"], r"^backend=torch: format=fp8_e4m3 runs as fake-quantization"),
    (["format=int8"], r"^format='int8': allowed are int, fp8_e4m3"),
])
def test_bad_top_level_formats_fail_in_one_line_before_the_model_loads(tiny_config, overrides, message):
    from ptq.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message) as error:
        validate(tiny_config(*overrides))
    assert "\n" not in str(error.value)


def test_top_level_format_reaches_every_weight_step_and_fp8_activations_are_quantized(tiny_config, tmp_path):
    from ptq.config import validate
    from ptq.pipeline import run

    steps = validate(tiny_config("method=gptq", "format=mxfp4", "bits=4", "group_size=32"))
    assert steps[0].weight.format == "mxfp4"
    weight_only = run(tiny_config("method=rtn", "format=fp8_e4m3", "bits=8", "group_size=null"), tmp_path / "w8")
    w8a8 = run(tiny_config("method=fp8_dynamic", "eval.baseline=false"), tmp_path / "w8a8")
    assert w8a8["metrics"]["quantized"]["perplexity"] != weight_only["metrics"]["quantized"]["perplexity"]
    assert weight_only["metrics"]["quantized"]["perplexity"] == pytest.approx(
        weight_only["metrics"]["baseline"]["perplexity"], rel=0.02)
