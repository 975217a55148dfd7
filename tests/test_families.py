"""Model families: each mapping names every linear of every block, smoothing leaves the fp model unchanged, and
[awq, rtn] / [smoothquant, rtn W8A8] calibrate end to end — on tiny random models of every registered family."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ptq.calibrate import calibrate
from ptq.models.mappings import LLAMA, MAPPINGS, UnknownArchitectureError, blocks_of, mapping_for
from ptq.nn import LINEAR_TYPES, FakeQuantLinear
from ptq.spec import QuantSpec
from ptq.transforms.awq import AWQ
from ptq.transforms.rtn import RTN
from ptq.transforms.scaling import scalable_groups
from ptq.transforms.smoothquant import SmoothQuant

VOCAB = 97
OUTLIERS = [3, 9, 14]
ATTENTION = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _gemma3_multimodal():
    from transformers import Gemma3Config

    text = {**ATTENTION, "vocab_size": 300, "head_dim": 16}
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                        boi_token_index=297, eoi_token_index=298)


def _config(name: str) -> Callable[[], object]:
    import transformers as T

    falcon = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
                  eos_token_id=2)
    return {
        "llama": lambda: T.LlamaConfig(**ATTENTION),
        "mistral": lambda: T.MistralConfig(**ATTENTION, head_dim=16),
        "qwen2": lambda: T.Qwen2Config(**ATTENTION),
        "qwen3": lambda: T.Qwen3Config(**ATTENTION, head_dim=16),
        "gemma": lambda: T.GemmaConfig(**ATTENTION, head_dim=16, **TOKENS),
        "gemma2": lambda: T.Gemma2Config(**ATTENTION, head_dim=16, **TOKENS),
        "gemma3_text": lambda: T.Gemma3TextConfig(**ATTENTION, head_dim=16, **TOKENS),
        "gemma3": _gemma3_multimodal,
        "phi3": lambda: T.Phi3Config(**ATTENTION, **TOKENS),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=64, **TOKENS),
        "opt-350m": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=32, do_layer_norm_before=False,
                                        **TOKENS),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96,
                                     bos_token_id=1, eos_token_id=2),
        "falcon-7b": lambda: T.FalconConfig(**falcon),
        "falcon-40b": lambda: T.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2),
        "falcon-rw": lambda: T.FalconConfig(**falcon, parallel_attn=False, multi_query=False),
    }[name]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "opt",
            "opt-350m", "gpt2", "falcon-7b", "falcon-40b", "falcon-rw"]


@torch.no_grad()
def family_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny random model whose norms, biases and a few outlier channels make rescaling errors visible."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = _config(name)()
    model_class = Gemma3ForConditionalGeneration if name == "gemma3" else AutoModelForCausalLM
    model = (model_class(config) if name == "gemma3" else model_class.from_config(config)).eval()
    for module in blocks_of(model, mapping_for(model)).modules():
        if isinstance(module, LINEAR_TYPES):
            if module.bias is not None:
                module.bias.normal_(0, 0.1)
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1:
            module.weight.normal_(1.0, 0.5)
            module.weight[OUTLIERS] *= 10
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0, 0.2)
    return model


def samples(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_every_family_has_a_test():
    assert {name.split("-")[0] for name in FAMILIES} == set(MAPPINGS)


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    model, x = family_model(name), samples()
    mapping = mapping_for(model)
    prefix = mapping.blocks + "."
    blocks = blocks_of(model, mapping)
    expected = {f"{prefix}{i}.{linear}" for i in range(len(blocks)) for linear in mapping.linear_names}
    found = {n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
    in_blocks = {n for n in found if n.startswith(prefix)}
    assert in_blocks == expected, "the mapping misses or invents linears"
    # the head; Gemma 3's image side; OPT-350m's embedding projections
    outside = ("lm_head", "model.vision_tower.", "model.multi_modal_projector.", "model.decoder.project_")
    assert all(n.startswith(outside) for n in found - in_blocks), found - in_blocks

    reference = logits(model, x)
    smoothed = copy.deepcopy(model)
    calibrate(smoothed, mapping, x, [SmoothQuant(alpha=0.8, include_linear_prev=True)], progress=False)
    assert relative_error(logits(smoothed, x), reference) <= 1e-5

    w4 = QuantSpec(bits=4, symmetric=False, group_size=32)
    w8, a8 = QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token")
    for steps in ([AWQ(weight=w4, grid=10), RTN(weight=w4)], [SmoothQuant(), RTN(weight=w8, activations=a8)]):
        quantized = copy.deepcopy(model)
        calibrate(quantized, mapping, x, steps, progress=False)
        for i in range(len(blocks)):
            for linear in mapping.linear_names:
                assert isinstance(blocks_of(quantized, mapping)[i].get_submodule(linear), FakeQuantLinear)
        error = relative_error(logits(quantized, x), reference)
        assert 0 < error < 1, (steps[0].name, error)


def test_grouped_query_attention_keeps_o_proj_quantized_but_unscaled():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**ATTENTION, "num_key_value_heads": 2})).eval()
    mapping = mapping_for(model)
    o_group = next(g for g in mapping.groups if "self_attn.o_proj" in g.linears)
    assert o_group.prev is None and "self_attn.o_proj" in mapping.linear_names
    # Used directly, the Llama mapping still skips v→o: v_proj has fewer outputs than o_proj has inputs.
    assert [g.prev for g in scalable_groups(model.model.layers[0], LLAMA)] == [
        "input_layernorm", "post_attention_layernorm", "mlp.up_proj"]


def _renamed(name: str, model_type: str) -> nn.Module:
    model = family_model(name)
    model.config.model_type = model_type
    return model


def test_unregistered_architecture_is_inferred_from_module_names():
    mapping = mapping_for(_renamed("llama", "my_llama"))
    assert mapping.blocks == "model.layers" and mapping.groups == LLAMA.groups
    gemma = mapping_for(_renamed("gemma", "my_gemma"))
    assert [g.fold for g in gemma.groups] == ["norm_plus_one", "linear", "norm_plus_one", "linear"]


def test_ambiguous_or_unknown_architecture_fails_with_a_hint():
    # Gemma-2 names fit both Llama's groups and Gemma-2's (whose MLP reads pre_feedforward_layernorm).
    with pytest.raises(UnknownArchitectureError, match="2 known layouts match.*MAPPINGS"):
        mapping_for(_renamed("gemma2", "my_gemma2"))

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"model_type": "toy"})()
            self.layers = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2)])

    with pytest.raises(UnknownArchitectureError, match="model_type='toy'.*ptq.models.mappings.MAPPINGS"):
        mapping_for(Toy())
