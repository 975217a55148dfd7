"""SmoothQuant: eq. 4's scales make per-token int8 activations easier, leave the fp model unchanged, and W8A8 after
smoothing beats plain W8A8 on a model with outlier channels."""

from __future__ import annotations

import copy

import pytest
import torch

from ptq.affine import quantize_dynamic
from ptq.calibrate import calibrate
from ptq.config import validate
from ptq.models.mappings import mapping_for
from ptq.spec import QuantSpec
from ptq.transforms.gptq import GPTQ
from ptq.transforms.rtn import RTN
from ptq.transforms.smoothquant import SmoothQuant, smoothing_scales

W8 = QuantSpec(bits=8, granularity="channel")
A8 = QuantSpec(bits=8, granularity="token")


def outlier_activations(tokens: int = 256, features: int = 64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(tokens, features, generator=torch.Generator().manual_seed(seed))
    x[:, [5, 21, 40]] *= 60
    return x


def w8a8_error(x: torch.Tensor, weight: torch.Tensor) -> float:
    """‖Q_token(x) Q_channel(W)ᵀ − x Wᵀ‖ / ‖x Wᵀ‖ with int8 per-token activations and per-channel weights."""
    reference = x @ weight.T
    output = quantize_dynamic(x, A8) @ quantize_dynamic(weight, W8).T
    return ((output - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_lowers_per_token_int8_error_with_outlier_channels(alpha):
    x = outlier_activations()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    s = smoothing_scales(x.abs().amax(dim=0), weight, alpha)
    torch.testing.assert_close((x / s) @ (weight * s).T, x @ weight.T, rtol=1e-4, atol=1e-3)
    assert w8a8_error(x / s, weight * s) < 0.5 * w8a8_error(x, weight)


def test_scales_follow_equation_4():
    act, weight = torch.tensor([4.0, 1.0, 9.0]), torch.tensor([[1.0, -2.0, 0.5], [-4.0, 1.0, 0.25]])
    expected = act.pow(0.5) / torch.tensor([4.0, 2.0, 0.5]).pow(0.5)
    torch.testing.assert_close(smoothing_scales(act, weight, 0.5), expected)


@torch.no_grad()
def tiny_llama_with_outliers(seed: int = 0):
    """Outlier channels in the norm weights put outliers into every q/k/v and gate/up input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.normal_(1.0, 0.3)
            norm.weight[[5, 21, 40]] *= 60
    return model


def samples(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def model_error(reference, model, x) -> float:
    ref = reference(x).logits
    return ((model(x).logits - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("options", [{"alpha": 0.8}, {"alpha_search": True, "include_linear_prev": True}])
def test_smoothing_leaves_full_precision_logits_unchanged(options):
    reference, x = tiny_llama_with_outliers(), samples()
    model = copy.deepcopy(reference)
    step = SmoothQuant(**options)
    calibrate(model, mapping_for(model), x, [step], progress=False)
    assert model_error(reference, model, x) <= 1e-5
    assert sorted(step.chosen_alpha) == [0, 1] and set(step.chosen_alpha.values()) <= {*step.alpha_grid, 0.8}
    changed = not torch.allclose(model.model.layers[0].input_layernorm.weight,
                                 reference.model.layers[0].input_layernorm.weight)
    assert changed


def test_alpha_defaults_to_the_family_value():
    model, x = tiny_llama_with_outliers(), samples(n=2)
    step = SmoothQuant()
    calibrate(model, mapping_for(model), x, [step], progress=False)
    assert step.chosen_alpha == {0: 0.8, 1: 0.8}


def test_smoothquant_w8a8_beats_plain_w8a8():
    reference, x = tiny_llama_with_outliers(), samples()
    errors = {}
    for name, steps in {
        "w8a8": [RTN(weight=W8, activations=A8)],
        "smoothquant": [SmoothQuant(alpha=0.5), RTN(weight=W8, activations=A8)],
        "smoothquant_search": [SmoothQuant(alpha_search=True), RTN(weight=W8, activations=A8)],
        "smoothquant_gptq": [SmoothQuant(alpha=0.5), GPTQ(weight=W8, activations=A8)],
    }.items():
        model = copy.deepcopy(reference)
        calibrate(model, mapping_for(model), x, steps, progress=False)
        errors[name] = model_error(reference, model, x)
    for name in ("smoothquant", "smoothquant_search", "smoothquant_gptq"):
        assert errors[name] < 0.7 * errors["w8a8"], errors


@pytest.mark.parametrize("method, quantizer", [("smoothquant", RTN), ("smoothquant_gptq", GPTQ)])
def test_method_configs_build_smoothquant_then_w8a8(tiny_config, method, quantizer):
    steps = validate(tiny_config(f"method={method}"))
    assert [type(s) for s in steps] == [SmoothQuant, quantizer]
    assert steps[0].alpha == 0.8 and steps[1].weight == W8 and steps[1].activations == A8


@pytest.mark.parametrize("options, message", [({"alpha": 1.5}, "alpha=1.5"), ({"alpha_grid": []}, "alpha_grid=")])
def test_bad_options_fail_with_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        SmoothQuant(**options)
