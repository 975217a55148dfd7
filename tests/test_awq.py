"""AWQ: the chosen scales never increase the inspected module's error over s = 1, the chosen clip never increases a
group's output error over no clip, the fp model is unchanged without clipping, and AWQ-then-RTN beats RTN."""

from __future__ import annotations

import copy

import pytest
import torch

from ptq.affine import fake_quantize, minmax_qparams, slots
from ptq.calibrate import calibrate
from ptq.config import validate
from ptq.models.mappings import mapping_for
from ptq.spec import QuantSpec
from ptq.transforms.awq import (
    AWQ,
    awq_scales,
    clip,
    linear_output_mse,
    output_mse,
    search_clip,
    search_scales,
)
from ptq.transforms.gptq import GPTQ
from ptq.transforms.rtn import RTN

SPECS = [
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32),
    QuantSpec(bits=3, symmetric=True, granularity="group", group_size=40),  # ragged: 64 = 40 + 24
    QuantSpec(bits=4, symmetric=True, granularity="channel", group_size=None),
]


@torch.no_grad()
def tiny_llama_with_outliers(seed: int = 0, kv_heads: int = 4):
    """Outlier channels in the norm weights: the q/k/v and gate/up inputs carry a few large channels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.normal_(1.0, 0.3)
            norm.weight[[5, 21, 40]] *= 20
    return model


def samples(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(1))


def outlier_inputs(tokens: int = 128, features: int = 64) -> torch.Tensor:
    x = torch.randn(tokens, features, generator=torch.Generator().manual_seed(2))
    x[:, [5, 21, 40]] *= 20
    return x


def rtn(spec: QuantSpec):
    return lambda w: fake_quantize(w, *minmax_qparams(w, spec), spec)


@pytest.mark.parametrize("spec", SPECS, ids=["asym-g32", "sym-g40-ragged", "sym-channel"])
def test_chosen_scales_never_increase_the_module_error_over_unit_scale(spec):
    mlp, x = tiny_llama_with_outliers().model.layers[0].mlp, outlier_inputs()
    linears = [mlp.gate_proj, mlp.up_proj]
    originals = [lin.weight.detach().clone() for lin in linears]
    with torch.no_grad():
        reference = mlp(x)
        for lin in linears:
            lin.weight.data = rtn(spec)(lin.weight.data)
        unit_error = (mlp(x) - reference).pow(2).mean().item()
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.data = w.clone()

    result = search_scales(linears, x.abs().mean(dim=0), output_mse(lambda: mlp(x)), rtn(spec), grid=20)

    assert all(torch.equal(lin.weight, w) for lin, w in zip(linears, originals, strict=True)), "weights restored"
    assert result.alphas[0] == 0 and len(result.errors) == 20
    assert result.errors[0] == pytest.approx(unit_error, rel=1e-5)
    assert min(result.errors) <= unit_error
    assert min(result.errors) < 0.9 * unit_error, "outlier channels: some α > 0 must help"
    torch.testing.assert_close(result.scales, awq_scales(x.abs().mean(dim=0), result.alphas[result.best]))


def test_linear_output_error_from_the_gram_matrix_equals_running_the_linear():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(64, 24), outlier_inputs()
    direct, via_gram = output_mse(lambda: linear(x)), linear_output_mse(linear, x.T @ x, x.shape[0])
    with torch.no_grad():
        linear.weight.add_(0.05 * torch.randn_like(linear.weight))
    assert via_gram() == pytest.approx(direct(), rel=1e-4)
    assert via_gram() > 0


def test_scales_are_normalised_and_unit_at_alpha_zero():
    x_mean = torch.tensor([0.5, 2.0, 8.0])
    torch.testing.assert_close(awq_scales(x_mean, 0.0), torch.ones(3))
    s = awq_scales(x_mean, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0) and torch.all(s.diff() > 0)


@pytest.mark.parametrize("spec", SPECS, ids=["asym-g32", "sym-g40-ragged", "sym-channel"])
def test_chosen_clip_never_increases_the_group_output_error(spec):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    weight[::7, ::5] *= 6  # a few large weights that are worth clipping
    x = outlier_inputs()
    max_val = search_clip(weight, x, spec, grid=20, max_shrink=0.5, rows=16)
    full = slots(weight, spec).abs().amax(dim=-1)
    assert max_val.shape == full.shape and torch.all(max_val <= full) and torch.all(max_val >= 0.55 * full - 1e-6)

    def group_error(w: torch.Tensor) -> torch.Tensor:
        xs = slots(x, spec, pad=0.0)
        difference = slots(rtn(spec)(w), spec) - slots(weight, spec)
        return torch.einsum("tgk,ogk->otg", xs, difference).pow(2).mean(dim=1)  # [out, groups]

    clipped = clip(weight, max_val, spec)
    assert torch.all(group_error(clipped) <= group_error(weight) * (1 + 1e-5) + 1e-7)
    assert group_error(clipped).sum() < group_error(weight).sum()


@pytest.mark.parametrize("search_dtype", ["float32", "bfloat16"])
def test_scaling_alone_leaves_full_precision_logits_unchanged(search_dtype):
    reference, x = tiny_llama_with_outliers(), samples()
    model = copy.deepcopy(reference)
    step = AWQ(weight=SPECS[0], clip_search=False, search_dtype=search_dtype)
    calibrate(model, mapping_for(model), x, [step], progress=False)
    with torch.no_grad():
        ref, out = reference(x).logits, model(x).logits
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert len(step.searches) == 2 * 4
    for name, result in step.searches.items():
        assert result.errors[result.best] <= result.errors[0], name  # never worse than s = 1
    assert any(result.best > 0 for result in step.searches.values())


def test_clipping_only_shrinks_weights_and_skips_q_k():
    reference, x = tiny_llama_with_outliers(), samples(n=4)
    model = copy.deepcopy(reference)
    calibrate(model, mapping_for(model), x, [AWQ(weight=SPECS[0], grid=1)], progress=False)
    layer, ref_layer = model.model.layers[0], reference.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        assert torch.equal(layer.get_submodule(name).weight, ref_layer.get_submodule(name).weight)
    down, ref_down = layer.mlp.down_proj.weight, ref_layer.mlp.down_proj.weight
    assert torch.all(down.abs() <= ref_down.abs()) and not torch.equal(down, ref_down)


class ClipAfterStreaming:
    """The clip search fed by a fresh pass over the (already scaled) block: what AWQ's captured inputs replace."""

    name = "clip_after_streaming"

    def __init__(self, awq: AWQ) -> None:
        self.awq = awq

    def apply(self, ctx) -> None:
        names = self.awq.clipped_linears(ctx)
        step = max(1, sum(x.shape[:-1].numel() for x in ctx.inputs) // self.awq.clip_tokens)
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        ctx.stream({name: lambda x, kept=seen[name]: kept.append(x.reshape(-1, x.shape[-1])[::step])
                    for name in names})
        for name in names:
            self.awq.clip_linear(ctx.module(name), torch.cat(seen[name]))


def test_clip_search_sees_each_linear_input_as_scaled():
    reference, x = tiny_llama_with_outliers(), samples(n=6)
    models = {way: copy.deepcopy(reference) for way in ("captured", "streamed")}
    calibrate(models["captured"], mapping_for(reference), x, [AWQ(weight=SPECS[0], clip_tokens=64)], batch_size=4,
              progress=False)
    steps = [AWQ(weight=SPECS[0], clip_search=False), ClipAfterStreaming(AWQ(weight=SPECS[0], clip_tokens=64))]
    calibrate(models["streamed"], mapping_for(reference), x, steps, batch_size=4, progress=False)
    clipped = [n for n, m in reference.named_modules() if n.endswith(("o_proj", "gate_proj", "up_proj", "down_proj"))]
    assert clipped
    for name in clipped:
        a, b = (models[way].get_submodule(name).weight for way in ("captured", "streamed"))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(models["captured"].model.layers[0].mlp.down_proj.weight,
                           reference.model.layers[0].mlp.down_proj.weight)


@torch.no_grad()
def model_error(reference, model, x) -> float:
    return (reference(x).logits - model(x).logits).pow(2).mean().item()


def test_awq_then_rtn_beats_rtn_at_3_bits():
    reference, x = tiny_llama_with_outliers(), samples(n=16)
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32)
    errors = {}
    for name, steps in {"rtn": [RTN(weight=spec)], "awq": [AWQ(weight=spec), RTN(weight=spec)],
                        "awq_bf16_search": [AWQ(weight=spec, search_dtype="bfloat16"), RTN(weight=spec)],
                        "awq_gptq": [AWQ(weight=spec), GPTQ(weight=spec)]}.items():
        model = copy.deepcopy(reference)
        calibrate(model, mapping_for(model), x, steps, progress=False)
        errors[name] = model_error(reference, model, x)
    assert errors["awq"] < 0.5 * errors["rtn"], errors
    assert errors["awq_bf16_search"] < 0.5 * errors["rtn"], errors
    assert errors["awq_gptq"] < 0.5 * errors["rtn"], errors


def test_grouped_query_attention_still_quantizes_o_proj():
    model, x = tiny_llama_with_outliers(kv_heads=2), samples(n=2, length=16)
    step = AWQ(weight=SPECS[0], grid=4, clip_grid=4)
    calibrate(model, mapping_for(model), x, [step, RTN(weight=SPECS[0])], progress=False)
    assert not any(name.endswith("v_proj") for name in step.searches)
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "FakeQuantLinear"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_awq_on_cuda_matches_cpu():
    reference, x = tiny_llama_with_outliers(), samples(n=4)
    models = {device: copy.deepcopy(reference) for device in ("cpu", "cuda")}
    for device, model in models.items():
        calibrate(model, mapping_for(model), x, [AWQ(weight=SPECS[0]), RTN(weight=SPECS[0])], device=device,
                  progress=False)
    error = {device: model_error(reference, model, x) for device, model in models.items()}
    assert error["cuda"] == pytest.approx(error["cpu"], rel=0.05)


@pytest.mark.parametrize("method, quantizer", [("awq", RTN), ("awq_gptq", GPTQ)])
def test_method_configs_build_awq_then_quantizer_with_one_spec(tiny_config, method, quantizer):
    steps = validate(tiny_config(f"method={method}", "bits=3", "group_size=64"))
    assert [type(s) for s in steps] == [AWQ, quantizer]
    expected = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64)
    assert steps[0].weight == steps[1].weight == expected and steps[0].clip_search


@pytest.mark.parametrize("options, message", [
    ({"grid": 0}, "grid=0"),
    ({"max_shrink": 1.0}, "max_shrink=1.0"),
    ({"search_dtype": "int8"}, "search_dtype='int8'"),
    ({"weight": QuantSpec(bits=4, granularity="tensor")}, "weight.granularity='tensor'"),
])
def test_bad_options_fail_with_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        AWQ(**{"weight": SPECS[0], **options})
