"""ptq's own checkpoint format and the export stage of a run: what is written reproduces the run's fake-quantized
model bit for bit, a run reloads it with method=none, and what a format cannot hold fails before calibration."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from test_families import family_model, logits, samples
from transformers import LlamaForCausalLM

from ptq.affine import round_scale
from ptq.calibrate import calibrate
from ptq.config import ConfigError, validate
from ptq.export import EXPORTERS, ExportContext
from ptq.export.ptq_format import load_ptq_checkpoint, read_checkpoint
from ptq.models import mapping_for
from ptq.models.loading import random_llama_config
from ptq.nn import FakeQuantLinear
from ptq.pipeline import run
from ptq.spec import QuantSpec
from ptq.transforms import build_steps

GROUP = {"granularity": "group", "group_size": 24}  # 64 and 160 input features: a ragged last group
SCHEMES = {
    "rtn w2 asymmetric ragged groups": [{"name": "rtn", "weight": {"bits": 2, "symmetric": False, **GROUP}}],
    "rtn w4 symmetric channel fp16 scales": [
        {"name": "rtn", "weight": {"bits": 4, "granularity": "channel", "scale_dtype": "float16"}}],
    "rtn w6 symmetric tensor": [{"name": "rtn", "weight": {"bits": 6, "granularity": "tensor"}}],
    "rtn w8 asymmetric groups bf16 scales": [
        {"name": "rtn", "weight": {"bits": 8, "symmetric": False, **GROUP, "scale_dtype": "bfloat16"}}],
    "gptq w3 act-order ragged groups": [{"name": "gptq", "weight": {"bits": 3, **GROUP}, "act_order": True}],
    "w8a8 dynamic": [{"name": "rtn", "weight": {"bits": 8, "granularity": "channel"},
                      "activations": {"bits": 8, "granularity": "token"}}],
    "w8a8 static": [{"name": "rtn", "weight": {"bits": 8, "granularity": "channel"},
                     "activations": {"bits": 8, "symmetric": False, "granularity": "tensor",
                                     "observer": {"name": "minmax"}}}],
    "mixed w3..w5": [{"name": "mixed", "weight": {"bits": 3, **GROUP}, "high_bits": 5, "avg_bits": 4.0}],
    "gptq w4a4 clipped": [{"name": "gptq", "weight": {"bits": 4, **GROUP},
                           "activations": {"bits": 4, "granularity": "token", "clip_ratio": 0.8}}],
}


def calibrated_llama(steps: list[dict]) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(random_llama_config(vocab_size=96)).eval()
    samples = torch.randint(0, 96, (4, 16))
    built = build_steps(steps, {"name": "minmax"})
    mapping = mapping_for(model)
    for step in built:
        if hasattr(step, "prepare"):
            step.prepare(model, mapping, samples, 2, "cpu")
    calibrate(model, mapping, samples, built, "cpu", batch_size=2, progress=False)
    return model


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_checkpoint_reproduces_every_integer_scale_and_weight(scheme, tmp_path):
    model = calibrated_llama(SCHEMES[scheme])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    EXPORTERS["ptq"].write(model, tmp_path, ExportContext())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the run's model is untouched
    layers, _, manifest = read_checkpoint(tmp_path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert set(layers) == set(linears) == set(manifest["layers"]) and len(linears) == 14
    for name, linear in linears.items():
        stored = layers[name]
        assert stored.weight_spec == linear.weight_spec
        assert torch.equal(stored.q, linear.weight_int)
        assert torch.equal(stored.scale, linear.weight_scale.float())
        assert torch.equal(stored.weight.to(linear.weight.dtype), linear.weight), name


@pytest.mark.parametrize("scheme", ["gptq w3 act-order ragged groups", "w8a8 static", "mixed w3..w5",
                                    "gptq w4a4 clipped"])
def test_reloaded_model_computes_what_the_run_computed(scheme, tmp_path):
    model = calibrated_llama(SCHEMES[scheme])
    EXPORTERS["ptq"].write(model, tmp_path, ExportContext())
    reloaded = load_ptq_checkpoint(tmp_path).eval()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_scales_are_rounded_to_their_dtype_before_use():
    scale = torch.tensor([1e-9, 0.1, 3.0e5, 1 / 3])
    half = round_scale(scale, QuantSpec(scale_dtype="float16"))
    assert half.dtype == torch.float32 and torch.equal(half, half.half().float())
    assert half[0] == torch.finfo(torch.float16).tiny and half[2] == torch.finfo(torch.float16).max
    brain = round_scale(scale, QuantSpec(scale_dtype="bfloat16"))
    assert torch.equal(brain, brain.bfloat16().float()) and not torch.equal(brain, half)
    assert torch.equal(round_scale(scale, QuantSpec()), scale)
    model = calibrated_llama(SCHEMES["rtn w4 symmetric channel fp16 scales"])
    for linear in (m for m in model.modules() if isinstance(m, FakeQuantLinear)):
        assert torch.equal(linear.weight_scale, linear.weight_scale.half().float())


@pytest.mark.parametrize(("export", "scale_dtype"), [("none", "float32"), ("ptq", "float32"), ("gguf", "float16"),
                                                      ("compressed_tensors", "bfloat16")])
def test_scale_dtype_auto_is_what_the_export_stores_exactly(tiny_config, export, scale_dtype):
    steps = validate(tiny_config("method=rtn", f"export={export}"))
    assert steps[0].weight.scale_dtype == scale_dtype


def test_scale_dtype_follows_a_half_model_and_a_step_may_set_its_own(tiny_config):
    steps = validate(tiny_config("export=compressed_tensors", "model.dtype=float16"))
    assert steps[0].weight.scale_dtype == "float16"
    steps = validate(tiny_config("scale_dtype=float16", "+method.steps.0.weight.scale_dtype=bfloat16"))
    assert steps[0].weight.scale_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"^scale_dtype='fp8': allowed are auto, float32"):
        validate(tiny_config("scale_dtype=fp8"))
    with pytest.raises(ConfigError, match=r"^export.name='onnx': allowed are none, compressed_tensors"):
        validate(tiny_config("export.name=onnx"))


def test_run_exports_and_method_none_reloads_the_same_perplexity(tiny_config, tmp_path, capsys):
    results = run(tiny_config("method=gptq", "bits=3", "group_size=24", "method.steps.0.act_order=true",
                              "export=ptq"), tmp_path / "run")
    export = json.loads((tmp_path / "run" / "results.json").read_text())["export"]
    assert export["format"] == "ptq" and export["path"] == str(tmp_path / "run" / "export")
    assert export["mb"] > 0 and export["fp16_mb"] == results["size"]["fp16_mb"]
    assert f"export: {export['path']}" in capsys.readouterr().out
    reloaded = run(tiny_config("model=hf", f"model.source={export['path']}", "method=none"), tmp_path / "eval")
    assert reloaded["metrics"]["quantized"] == results["metrics"]["quantized"]
    assert reloaded["metrics"]["baseline"] == {} and "calibrate" not in reloaded["timings_s"]
    assert reloaded["size"]["checkpoint_mb"] == pytest.approx(export["mb"])


def test_an_earlier_export_in_the_run_directory_is_kept(tiny_config, tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "mine.txt").write_text("keep me")
    run(tiny_config("export=ptq", "eval.baseline=false"), tmp_path)
    assert (tmp_path / "export.previous-1" / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "export" / "ptq_quantization.json").is_file()


def test_schemes_a_format_cannot_hold_fail_before_the_model_loads(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr("ptq.pipeline.load_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"^export=ptq: w8 channel asymmetric · a8 token dynamic · fp16 outliers"):
        run(tiny_config("method=llm_int8", "export=ptq"), tmp_path)
    with pytest.raises(ConfigError, match=r"^export=ptq: method=none quantizes nothing"):
        run(tiny_config("method=none", "export=ptq"), tmp_path)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_the_digits_int8_checkpoint_is_about_four_times_smaller_than_fp32(tmp_path, granularity):
    cfg = compose_config(["model=digits_mlp", "method=rtn", "bits=8", "group_size=null", "export=ptq", "logger=none",
                          "progress=false", f"method.steps.0.weight.granularity={granularity}"], tmp_path)
    export = run(cfg, tmp_path)["export"]
    assert 3.5 < export["fp32_mb"] / export["mb"] < 4.0


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "gemma3", "opt", "gpt2", "falcon-40b"])
def test_every_family_reloads_to_the_same_logits(family, tmp_path):
    model = family_model(family)
    steps = build_steps([{"name": "gptq", "weight": {"bits": 4, "symmetric": False, "granularity": "group",
                                                     "group_size": 32}}], {"name": "minmax"})
    calibrate(model, mapping_for(model), samples(), steps, "cpu", batch_size=2, progress=False)
    EXPORTERS["ptq"].write(model, tmp_path, ExportContext())
    reloaded = load_ptq_checkpoint(tmp_path).eval()
    assert torch.equal(logits(reloaded, samples(2)), logits(model, samples(2)))


def test_export_options_are_checked_before_the_model_loads(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr("ptq.pipeline.load_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"^export.embeddings='q4': allowed are model, q8_0$"):
        run(tiny_config("export=gguf", "export.embeddings=q4"), tmp_path)
    with pytest.raises(ConfigError, match=r"^export.shards: unknown option of export=ptq; allowed are none$"):
        run(tiny_config("export=ptq", "+export.shards=2"), tmp_path)


def test_methods_with_online_modules_are_refused_by_formats_that_cannot_run_them(tiny_config, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr("ptq.pipeline.load_model", lambda cfg: pytest.fail("the model was loaded"))
    for export in ("compressed_tensors", "gguf"):
        with pytest.raises(ConfigError, match=rf"^export={export}: method=quarot_rtn adds run-time modules.*"
                                              r"allowed are export=ptq, none"):
            run(tiny_config("method=quarot_rtn", f"export={export}"), tmp_path)


QUAROT_W4A4KV4 = [
    {"name": "rotation", "attention_output_hadamard": True},
    {"name": "kv_cache", "key": {"bits": 4, "granularity": "head", "clip_ratio": 0.95},
     "value": {"bits": 4, "granularity": "token"}},
    {"name": "rtn", "weight": {"bits": 4, **GROUP},
     "activations": {"bits": 4, "granularity": "token", "clip_ratio": 0.9}},
]


def test_online_rotations_and_the_kv_cache_quantizers_survive_save_and_reload(tmp_path):
    model = calibrated_llama(QUAROT_W4A4KV4)
    EXPORTERS["ptq"].write(model, tmp_path, ExportContext())
    online = json.loads((tmp_path / "ptq_quantization.json").read_text())["online"]
    kinds = sorted(entry["kind"] for entry in online.values())
    assert kinds == ["attention"] * 2 + ["input_hadamard"] * 4  # per block: R3 + KV, R4, o_proj's Hadamard
    reloaded = load_ptq_checkpoint(tmp_path).eval()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_a_quarot_run_exports_in_ptq_format_and_reloads_the_same_perplexity(tiny_config, tmp_path):
    results = run(tiny_config("method=quarot_gptq", "export=ptq", "eval.baseline=false"), tmp_path / "run")
    reloaded = run(tiny_config("model=hf", f"model.source={results['export']['path']}", "method=none"),
                   tmp_path / "eval")
    assert reloaded["metrics"]["quantized"] == results["metrics"]["quantized"]
