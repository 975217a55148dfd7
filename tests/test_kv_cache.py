"""KV-cache quantization: the keys and values every family's attention reads are on the quantized grid (after RoPE),
the model's own eager attention and sdpa read the same quantized cache, generating with a cache gives the logits of
one full pass, and the specs fail in one line."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from test_families import FAMILIES, family_model, logits, relative_error, samples
from torch import nn

from ptq.calibrate import calibrate
from ptq.config import CONFIG_DIR, validate
from ptq.kv_cache import KVQuantizer, KVSpec
from ptq.models.mappings import mapping_for
from ptq.nn import ActivationQuantizer
from ptq.spec import QuantSpec
from ptq.transforms.kv_cache import KVCache, scheme_label

KV4 = {"bits": 4, "symmetric": False, "granularity": "head"}
KV2 = {**KV4, "bits": 2}  # 4 levels: fewer than the 16 channels of a tiny model's head


def with_kv_cache(model: nn.Module, key: dict | None = KV4, value: dict | None = KV4) -> nn.Module:
    model = copy.deepcopy(model)
    calibrate(model, mapping_for(model), samples(), [KVCache(key=key, value=value)], progress=False)
    return model


@contextmanager
def attention_spy(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """Records the keys and values that scaled_dot_product_attention, or the model file's own eager attention
    (Gemma 2), receives while the context is open (hooks installed inside it capture the spied eager function)."""
    seen: list[torch.Tensor] = []
    sdpa = F.scaled_dot_product_attention
    modeling = sys.modules[type(model).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)  # Falcon has none: it calls sdpa itself

    def spy_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.extend([key, value])
        return sdpa(query, key, value, *args, **kwargs)

    def spy_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        seen.extend([key, value])
        return eager(module, query, key, value, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
        if eager is not None:
            patch.setattr(modeling, "eager_attention_forward", spy_eager)
        yield seen


def attention_inputs(model: nn.Module, x: torch.Tensor, seen: list[torch.Tensor]) -> list[torch.Tensor]:
    seen.clear()
    logits(model, x)
    return list(seen)


def most_levels_per_slot(tensor: torch.Tensor) -> int:
    """The largest number of distinct values among the head_dim channels of one token and head."""
    return max(len(row.unique()) for row in tensor.reshape(-1, tensor.shape[-1]))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_attends_over_the_quantized_cache(name, monkeypatch):
    x = samples()
    model = family_model(name)
    with attention_spy(model, monkeypatch) as seen:
        full = attention_inputs(model, x, seen)
        assert full and most_levels_per_slot(full[0]) > 4  # the spy sees what attention reads: fp keys at first
        quantized = attention_inputs(with_kv_cache(model, KV2, KV2), x, seen)
        assert len(quantized) == len(full)
        assert all(most_levels_per_slot(t) <= 4 for t in quantized)  # int2: at most 4 levels per token and head
        only_keys = attention_inputs(with_kv_cache(model, KV2, None), x, seen)
        assert most_levels_per_slot(only_keys[0]) <= 4 < most_levels_per_slot(only_keys[1])


def test_eager_attention_reads_the_same_quantized_cache_as_sdpa():
    x = samples()
    sdpa = family_model("llama")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    reference = logits(sdpa, x)
    quantized_sdpa, quantized_eager = logits(with_kv_cache(sdpa), x), logits(with_kv_cache(eager), x)
    assert relative_error(quantized_eager, quantized_sdpa) < 1e-5
    assert relative_error(quantized_sdpa, reference) > 1e-2


@pytest.mark.parametrize("name", ["llama", "falcon-7b"])  # the attention interface; Falcon's cache argument
def test_generating_with_the_cache_gives_the_logits_of_one_pass(name):
    x = samples(2, 12)
    model = with_kv_cache(family_model(name))
    full = logits(model, x)
    with torch.no_grad():
        step = model(input_ids=x[:, :8], use_cache=True)
        for t in range(8, 12):
            step = model(input_ids=x[:, t:t + 1], cache=step.past_key_values, use_cache=True)
    assert relative_error(step.logits[:, -1], full[:, -1]) < 1e-5


def test_fewer_kv_bits_cost_more():
    x = samples()
    model = family_model("llama")
    reference = logits(model, x)
    errors = [relative_error(logits(with_kv_cache(model, {**KV4, "bits": b}, {**KV4, "bits": b}), x), reference)
              for b in (8, 4, 2)]
    assert 0 < errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize(("granularity", "group_size", "slot"), [("head", None, 16), ("group", 4, 4),
                                                                  ("token", None, 64)])
def test_kv_layouts_share_one_scale_per_slot(granularity, group_size, slot):
    x = torch.randn(2, 4, 5, 16, generator=torch.Generator().manual_seed(0))  # [batch, heads, tokens, head_dim]
    spec = KVSpec(bits=2, symmetric=False, granularity=granularity, group_size=group_size)
    y = KVQuantizer(spec, head_dim=16)(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    rows = y.transpose(1, 2).reshape(2, 5, 64) if granularity == "token" else y
    assert most_levels_per_slot(rows.reshape(-1, slot)) <= 4


def test_clip_ratio_shrinks_the_range_and_clamps_beyond_it():
    x = torch.tensor([[0.3, 0.6, -0.9, 8.0]])
    spec = QuantSpec(bits=4, symmetric=True, granularity="token")
    full, clipped = ActivationQuantizer(spec)(x), ActivationQuantizer(spec, clip_ratio=0.5)(x)
    assert clipped.max() <= 0.5 * 10.0 + 1e-6 < full.max()
    assert (clipped - x)[0, :3].abs().max() < (full - x)[0, :3].abs().max()
    with pytest.raises(ValueError, match=r"clip_ratio=1.5: allowed is a number in \(0, 1\]"):
        ActivationQuantizer(spec, clip_ratio=1.5)


def test_kv_specs_fail_in_one_line():
    with pytest.raises(ValueError, match="key.granularity='channel': allowed are head, group, token"):
        KVCache(key={**KV4, "granularity": "channel"})
    with pytest.raises(ValueError, match="value.bits=9: allowed are integers 2..8"):
        KVCache(value={**KV4, "bits": 9})
    with pytest.raises(ValueError, match="key.scale: unknown key; allowed are bits, clip_ratio, granularity"):
        KVCache(key={**KV4, "scale": 1})
    with pytest.raises(ValueError, match="key=null, value=null"):
        KVCache()
    with pytest.raises(ValueError, match="group_size=5: allowed is a divisor of head_dim=16"):
        with_kv_cache(family_model("llama"), key={**KV4, "granularity": "group", "group_size": 5})


@pytest.mark.parametrize(("method", "label"), [("rtn_w4a4kv4", "W4A4KV4"), ("smoothquant_w4a4kv4", "W4A4KV4"),
                                               ("quarot_rtn", "W4A4KV4"), ("quarot_gptq", "W4A4KV4"),
                                               ("quarot_gptq_w4a8", "W4A8KV8"), ("gptq", "W4"), ("rtn_w8a8", "W8A8")])
def test_methods_name_their_scheme(method, label):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        assert scheme_label(validate(compose("config", overrides=[f"method={method}", "model=tiny-llama"]))) == label
        overridden = validate(compose("config", overrides=[f"method={method}", "model=tiny-llama", "bits=3",
                                                           "group_size=64"]))
    weight = [step for step in overridden if hasattr(step, "schemes")][-1].weight
    if method != "rtn_w8a8":  # the only one with fixed weight bits
        assert (weight.bits, weight.group_size) == (3, 64)
