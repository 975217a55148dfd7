"""compressed-tensors export (ptq.export.compressed_tensors): what transformers reloads is ptq's model, bit for bit.

Tiny random models of four families are calibrated directly (no pipeline), written with the exporter, read back
with ``from_pretrained`` (and ``from_pretrained_kwargs``), and compared with the calibrated model: every quantized
Linear's weight and the logits are equal, the file's integers and scales are ptq's, and the calibrated model is the
same after the write as before; on float grids (FP8, MXFP8, MXFP4, NVFP4) too. Schemes the format cannot hold
exactly are refused in one line, and each refusal's reason is shown to hold: written anyway, the scheme reloads
into another model, or compressed-tensors computes another value.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_families import VOCAB, family_model, samples
from tokenizers import Tokenizer, models
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ptq.affine import dequantize, minmax_qparams, quantize_dynamic
from ptq.calibrate import calibrate
from ptq.export import ExportContext, ExportError, ExportPlan
from ptq.export import compressed_tensors as exporter_module
from ptq.export.base import calibrated_linears
from ptq.export.compressed_tensors import (
    CompressedTensorsExporter,
    from_pretrained_kwargs,
    nvfp4_factors,
    nvfp4_scales,
    quantization_args,
)
from ptq.formats import E2M1, E4M3
from ptq.models import mapping_for
from ptq.nn import FakeQuantLinear
from ptq.spec import LinearScheme, QuantSpec
from ptq.transforms import build_steps
from ptq.transforms.base import swap_to_fake_quant
from ptq.transforms.mixed_precision import MixedPrecision
from ptq.transforms.rtn import RTN

EXPORTER = CompressedTensorsExporter()
W4_ASYM_G32 = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32}
W8_CHANNEL = {"bits": 8, "symmetric": True, "granularity": "channel"}
A8_TOKEN = {"bits": 8, "symmetric": True, "granularity": "token"}
A8_STATIC = {"bits": 8, "symmetric": False, "granularity": "tensor", "observer": {"name": "minmax"}}
FP8 = {"bits": 8, "symmetric": True, "format": "fp8_e4m3"}
MXFP8 = {"bits": 8, "symmetric": True, "format": "mxfp8", "granularity": "group", "group_size": 32}
MXFP4 = {**MXFP8, "bits": 4, "format": "mxfp4"}
NVFP4 = {"bits": 4, "symmetric": True, "format": "nvfp4", "granularity": "group", "group_size": 16}


def calibrated(family: str, *steps: dict, dtype: torch.dtype = torch.float32, scale_dtype: str = "float32"
               ) -> nn.Module:
    model = family_model(family)
    if dtype != torch.float32:  # loaded as the pipeline loads it (``.to`` would also round rotary buffers)
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    calibrate(model, mapping_for(model), samples(), build_steps(list(steps), {"name": "minmax"}, scale_dtype),
              progress=False)
    return model


def export(model: nn.Module, tmp_path: Path, tokenizer: object = None) -> Path:
    """Write ``model``; every write leaves its state dict as it was."""
    directory = tmp_path / "export"
    directory.mkdir(parents=True)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    written = EXPORTER.write(model, directory, ExportContext(tokenizer=tokenizer, description="ptq test"))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    return written


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=samples()).logits


@torch.no_grad()
def reload(directory: Path) -> nn.Module:
    """The checkpoint as the lead's loader opens it, after one forward pass (which decompresses int-quantized)."""
    model = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained_kwargs(directory)).eval()
    model(input_ids=samples()[:1, :4])
    return model


def quantization_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def stored_integers(tensors: dict[str, torch.Tensor], name: str, linear: FakeQuantLinear, fmt: str) -> torch.Tensor:
    """The signed integers the file holds for ``linear`` (unpacked with compressed-tensors' own unpacker)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if fmt == "int-quantized":
        return tensors[f"{name}.weight"]
    shape = tensors[f"{name}.weight_shape"]
    return unpack_from_int32(tensors[f"{name}.weight_packed"], linear.weight_spec.bits, shape)


def stored_zero(tensors: dict[str, torch.Tensor], name: str, linear: FakeQuantLinear, fmt: str) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    zero = tensors[f"{name}.weight_zero_point"]
    if fmt == "int-quantized" or linear.weight_spec.granularity == "tensor":
        return zero
    return unpack_from_int32(zero, linear.weight_spec.bits, linear.weight_scale.shape, packed_dim=0)


def assert_file_holds_ptq_integers(tensors: dict[str, torch.Tensor], name: str, linear: FakeQuantLinear,
                                   fmt: str) -> None:
    """The integers are ptq's shifted into the signed range, the scales ptq's in the model's dtype, and
    s · (q − z) from the file alone is FakeQuantLinear.weight."""
    spec, dtype = linear.weight_spec, linear.weight.dtype
    offset = 0 if spec.symmetric else 2 ** (spec.bits - 1)
    q = stored_integers(tensors, name, linear, fmt).to(torch.int16) + offset
    assert torch.equal(q, linear.weight_int.to(torch.int16)), name
    scale = tensors[f"{name}.weight_scale"]
    assert scale.dtype == dtype and torch.equal(scale.float().reshape(linear.weight_scale.shape),
                                                linear.weight_scale), name
    assert (f"{name}.weight_zero_point" in tensors) is not spec.symmetric, name
    zero = linear.weight_zero if spec.symmetric else stored_zero(tensors, name, linear, fmt).float() + offset
    assert torch.equal(zero.reshape(linear.weight_zero.shape), linear.weight_zero), name
    from_file = dequantize(q, scale.float().reshape(linear.weight_scale.shape), zero.reshape(
        linear.weight_zero.shape), spec)
    assert torch.equal(from_file.to(dtype), linear.weight), name


def assert_file_holds_ptq_floats(tensors: dict[str, torch.Tensor], name: str, linear: FakeQuantLinear) -> None:
    """The elements are ptq's (E4M3 as float8_e4m3fn, E2M1 packed two per byte); FP8 scales are ptq's in the model's
    dtype, MX ones its powers of two as E8M0 exponents, NVFP4 ones E4M3 values s with s / weight_global_scale ptq's
    block scale up to float32's rounding; no zero points."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    spec = linear.weight_spec
    if spec.bits == 8:
        codes = tensors[f"{name}.weight"]
        assert codes.dtype == torch.float8_e4m3fn, name
    else:
        codes = unpack_fp4_from_uint8(tensors[f"{name}.weight_packed"], *linear.weight_int.shape, dtype=torch.float32)
    assert torch.equal(codes.float(), linear.weight_int.float()), name
    assert f"{name}.weight_zero_point" not in tensors, name
    scale = tensors[f"{name}.weight_scale"]
    if spec.grid.scale == "e8m0":
        assert scale.dtype == torch.uint8 and torch.equal(torch.exp2(scale.float() - 127), linear.weight_scale), name
    elif spec.grid.tensor_scale:
        global_scale = tensors[f"{name}.weight_global_scale"]
        assert scale.dtype == torch.float8_e4m3fn and global_scale.dtype == torch.float32, name
        torch.testing.assert_close(scale.float() / global_scale, linear.weight_scale, rtol=2**-22, atol=0)
    else:
        assert scale.dtype == linear.weight.dtype and torch.equal(
            scale.float().reshape(linear.weight_scale.shape), linear.weight_scale), name
        scale = scale.float().reshape(linear.weight_scale.shape)
        from_file = dequantize(codes.float(), scale, torch.zeros_like(scale), spec)
        assert torch.equal(from_file.to(linear.weight.dtype), linear.weight), name


def assert_file_holds_ptq_grid(directory: Path, model: nn.Module) -> None:
    """Every calibrated Linear's tensors in the file are what ptq decided (integers or float elements, scales)."""
    tensors = load_file(directory / "model.safetensors")
    groups = quantization_config(directory)["config_groups"].values()
    for name, linear in calibrated_linears(model).items():
        fmt = next(g["format"] for g in groups if "Linear" in g["targets"] or name in g["targets"])
        if linear.weight_spec.grid.is_float:
            assert_file_holds_ptq_floats(tensors, name, linear)
        else:
            assert_file_holds_ptq_integers(tensors, name, linear, fmt)


def assert_reload_is_exact(model: nn.Module, directory: Path) -> nn.Module:
    """Every quantized Linear's reloaded weight is FakeQuantLinear.weight bit for bit, the logits are equal."""
    reloaded = reload(directory)
    linears = calibrated_linears(model)
    for name, linear in linears.items():
        weight = reloaded.get_submodule(name).weight
        assert weight.dtype == linear.weight.dtype and torch.equal(weight, linear.weight), name
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):  # not calibrated: stored as it was
            assert torch.equal(reloaded.get_submodule(name).weight, module.weight), name
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    return reloaded


@pytest.mark.parametrize(("family", "step"), [
    ("llama", {"name": "rtn", "weight": W4_ASYM_G32}),
    ("qwen2", {"name": "gptq", "weight": {**W4_ASYM_G32, "symmetric": True}, "act_order": True,
               "static_groups": True}),
    ("gemma3_text", {"name": "rtn", "weight": {"bits": 3, "symmetric": False, "granularity": "channel"}}),
    ("opt", {"name": "rtn", "weight": {"bits": 2, "symmetric": False, "granularity": "tensor"}}),
])
def test_weight_only_reloads_bit_for_bit(family, step, tmp_path):
    model = calibrated(family, step)
    directory = export(model, tmp_path)
    config = quantization_config(directory)
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert config["quantization_status"] == "compressed" and list(config["config_groups"]) == ["group_0"]
    assert config.get("dequantize", False) == (not step["weight"]["symmetric"])  # only asymmetric needs it
    assert_file_holds_ptq_grid(directory, model)
    reloaded = assert_reload_is_exact(model, directory)
    assert type(reloaded.get_submodule(next(iter(calibrated_linears(model))))) is nn.Linear


@pytest.mark.parametrize(("family", "step", "dtype", "fmt"), [
    ("qwen2", {"name": "rtn", "weight": FP8 | {"granularity": "group", "group_size": 32}}, "float32",
     "naive-quantized"),
    ("gemma3_text", {"name": "rtn", "weight": MXFP8}, "bfloat16", "mxfp8-quantized"),
    ("llama", {"name": "rtn", "weight": MXFP4}, "float16", "mxfp4-pack-quantized"),
    ("qwen2", {"name": "gptq", "weight": NVFP4}, "bfloat16", "nvfp4-pack-quantized"),  # s < 448 in some blocks
])
def test_float_weights_reload_bit_for_bit(family, step, dtype, fmt, tmp_path):
    model = calibrated(family, step, dtype=getattr(torch, dtype), scale_dtype=dtype)
    directory = export(model, tmp_path)
    config = quantization_config(directory)
    assert config["format"] == fmt and config["config_groups"]["group_0"]["weights"]["type"] == "float"
    assert config.get("dequantize", False) == (fmt != "naive-quantized")  # MX, NVFP4: decompressed in bfloat16
    assert from_pretrained_kwargs(directory)["quantization_config"].dequantize
    assert_file_holds_ptq_grid(directory, model)
    assert_reload_is_exact(model, directory)


@pytest.mark.parametrize("weight", [W4_ASYM_G32, {**W4_ASYM_G32, "symmetric": True}, MXFP4])
def test_plain_from_pretrained_loads_the_checkpoint(weight, tmp_path):
    model = calibrated("llama", {"name": "rtn", "weight": weight})
    directory = export(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()  # asymmetric, MX: config.json asks to dequantize
    torch.testing.assert_close(logits(plain), logits(model), rtol=0, atol=0)


def test_nvfp4_global_scale_is_chosen_by_the_bfloat16_reload():
    """Where compressed-tensors' s / G with G = 1 / g in float32 misses s · g by a bfloat16 rounding, the exporter
    writes a float32 neighbour of 1 / g that reloads every weight exactly (g found by search in random tensors)."""
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationScheme

    spec = QuantSpec(**NVFP4)
    g = torch.tensor(float.fromhex("0x1.8eaaa8p-17"))
    stored = E4M3.values[1:].flip(0).unsqueeze(1)  # one block per positive E4M3 scale, 448 first
    codes = torch.cat([E2M1.values, -E2M1.values]).expand(len(stored), -1)  # every element in every block
    weight = dequantize(codes, stored * g, torch.zeros_like(stored), spec).bfloat16()
    linear = FakeQuantLinear(nn.Linear(16, len(stored), bias=False, dtype=torch.bfloat16), weight, spec,
                             stored * g, torch.zeros_like(stored), codes)
    scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(spec))
    state = {"weight_packed": pack_fp4_to_uint8(codes), "weight_scale": stored.to(torch.float8_e4m3fn)}

    def reloaded(global_scale: torch.Tensor) -> torch.Tensor:
        return NVFP4PackedCompressor.decompress({**state, "weight_global_scale": global_scale}, scheme)["weight"]

    assert torch.equal(nvfp4_factors(linear.weight_scale)[0], stored)
    assert not torch.equal(reloaded((1 / g).reshape(1)), weight)
    chosen_stored, global_scale = nvfp4_scales("layer", linear, scheme)
    assert torch.equal(chosen_stored, stored) and global_scale.item() != (1 / g).item()
    assert torch.equal(reloaded(global_scale), weight)


@pytest.mark.parametrize(("family", "weight", "activations"), [
    ("gemma3_text", W8_CHANNEL, A8_TOKEN),
    ("llama", W8_CHANNEL, {**A8_TOKEN, "symmetric": False}),
    ("opt", W8_CHANNEL, A8_STATIC),
    ("qwen2", W8_CHANNEL, {**A8_STATIC, "symmetric": True}),
    ("llama", FP8 | {"granularity": "channel"}, FP8 | {"granularity": "token"}),  # method=fp8_dynamic
    ("opt", FP8 | {"granularity": "tensor"}, FP8 | {"granularity": "tensor", "observer": {"name": "minmax"}}),
])
def test_w8a8_reloads_with_fake_quantized_activations(family, weight, activations, tmp_path):
    model = calibrated(family, {"name": "rtn", "weight": weight, "activations": activations})
    directory = export(model, tmp_path)
    config = quantization_config(directory)
    inputs = config["config_groups"]["group_0"]["input_activations"]
    static, fp8 = "observer" in activations, "format" in activations
    assert config["format"] == ("float-quantized" if fp8 else "int-quantized") and inputs["dynamic"] is not static
    assert inputs["strategy"] == ("tensor" if static else "token") and inputs["symmetric"] == activations["symmetric"]
    assert inputs["type"] == ("float" if fp8 else "int")
    assert from_pretrained_kwargs(directory) == {}
    assert_file_holds_ptq_grid(directory, model)
    tensors = load_file(directory / "model.safetensors")
    for name, linear in calibrated_linears(model).items():
        quantizer = linear.input_quantizer
        assert (f"{name}.input_scale" in tensors) is static
        if static:
            assert torch.equal(tensors[f"{name}.input_scale"], quantizer.scale.reshape(1))
            zero = tensors.get(f"{name}.input_zero_point", torch.zeros(1, dtype=torch.int8))
            assert torch.equal(zero.float() + (0 if quantizer.spec.symmetric else 128), quantizer.zero.reshape(1))
    assert_reload_is_exact(model, directory)


def test_activations_change_the_logits_so_the_w8a8_test_can_fail(tmp_path):
    """Reloaded without its activation quantization (dequantized), a W8A8 checkpoint computes something else."""
    from transformers import CompressedTensorsConfig

    model = calibrated("llama", {"name": "rtn", "weight": W8_CHANNEL, "activations": A8_TOKEN})
    directory = export(model, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    assert not torch.equal(logits(dense), logits(model))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_model_with_scales_of_its_dtype(dtype, tmp_path):
    model = calibrated("llama", {"name": "rtn", "weight": {**W8_CHANNEL, "symmetric": False}},
                       dtype=getattr(torch, dtype), scale_dtype=dtype)
    directory = export(model, tmp_path)
    assert json.loads((directory / "config.json").read_text())["dtype"] == dtype
    assert_file_holds_ptq_grid(directory, model)
    assert_reload_is_exact(model, directory)


def mixed_precision(symmetric: bool) -> nn.Module:
    """A Llama whose Linears get several widths (3..8 bits, 4.5 on average, groups of 32)."""
    model = family_model("llama")
    step = MixedPrecision(weight=QuantSpec(bits=3, symmetric=symmetric, granularity="group", group_size=32),
                          high_bits=8, avg_bits=4.5)
    step.prepare(model, mapping_for(model), samples(), 4, "cpu")
    calibrate(model, mapping_for(model), samples(), [step], progress=False)
    return model


def test_mixed_precision_gets_one_config_group_per_width(tmp_path):
    model = mixed_precision(symmetric=True)
    directory = export(model, tmp_path)
    groups = quantization_config(directory)["config_groups"].values()
    widths = {linear.weight_spec.bits for linear in calibrated_linears(model).values()}
    assert len(widths) > 1 and sorted(g["weights"]["num_bits"] for g in groups) == sorted(widths)
    for group in groups:
        assert {calibrated_linears(model)[name].weight_spec.bits for name in group["targets"]} == {
            group["weights"]["num_bits"]}
    assert from_pretrained_kwargs(directory) == {}  # transformers' dequantizing load reads group_0 everywhere
    assert_file_holds_ptq_grid(directory, model)
    assert_reload_is_exact(model, directory)


def test_quantized_tied_head_is_stored_untied(tmp_path):
    model = calibrated("opt", {"name": "rtn", "weight": W4_ASYM_G32})  # OPT ties lm_head to the embeddings
    head = model.lm_head
    rtn = RTN(weight=QuantSpec(**W4_ASYM_G32))
    swap_to_fake_quant(model, "lm_head", head, rtn.weight, rtn.quantize_weight("lm_head", head.weight.float(), None))
    directory = export(model, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" not in config["quantization_config"]["ignore"]
    reloaded = assert_reload_is_exact(model, directory)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.get_input_embeddings().weight)


def test_write_leaves_the_model_unchanged_and_saves_the_tokenizer(tmp_path):
    model = calibrated("llama", {"name": "rtn", "weight": W8_CHANNEL, "activations": A8_STATIC})
    modules, config, reference = dict(model.named_modules()), model.config.to_dict(), logits(model)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        unk_token="t0")
    directory = export(model, tmp_path, tokenizer)  # which also compares the state dicts
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(module is modules[name] for name, module in model.named_modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(hasattr(module, "quantization_scheme") for module in model.modules())
    assert model.config.to_dict() == config
    assert torch.equal(logits(model), reference)
    assert AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids("t5") == 5
    assert (directory / "generation_config.json").is_file()
    assert "ptq test" in (directory / "README.md").read_text()


W4G32 = QuantSpec(bits=4, group_size=32)
REFUSED = [
    (LinearScheme(QuantSpec(bits=4, group_size=64)), frozenset({64, 96}), torch.float32, "llama",
     "in_features 96 not a multiple of group_size=64"),
    (LinearScheme(W4G32, act_order=True), frozenset({64}), torch.float32, "llama", "g_idx"),
    (LinearScheme(QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token"), outliers=True),
     frozenset({64}), torch.float32, "opt", "LLM.int8()"),
    (LinearScheme(W4G32), frozenset({64}), torch.float32, "digits_mlp", "not a transformers causal LM"),
    (LinearScheme(W4G32), frozenset({64}), torch.float32, "gpt2", "builds its Linears as Conv1D"),
    (LinearScheme(W4G32), frozenset({64}), torch.bfloat16, "llama", "scale_dtype=float32 is not exact"),
    (LinearScheme(QuantSpec(bits=4, group_size=32, scale_dtype="bfloat16")), frozenset({64}), torch.float16,
     "llama", "scale_dtype=bfloat16 is not exact in the float16"),
    (LinearScheme(QuantSpec(bits=8, granularity="channel", scale_dtype="bfloat16"),
                  QuantSpec(bits=8, granularity="token")),
     frozenset({64}), torch.bfloat16, "llama", "fake-quantizes a bfloat16 model's inputs in bfloat16"),
    (LinearScheme(QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token")),
     frozenset({64}), torch.float32, "opt", "opt flattens some Linears' inputs"),
    (LinearScheme(QuantSpec(**FP8, granularity="channel"), QuantSpec(**FP8, granularity="token")),
     frozenset({64}), torch.float32, "opt", "opt flattens some Linears' inputs"),
    (LinearScheme(QuantSpec(**FP8, granularity="channel")), frozenset({64}), torch.bfloat16, "llama",
     "scale_dtype=float32 is not exact in the bfloat16"),
    (LinearScheme(QuantSpec(**FP8 | {"format": "fp8_e5m2"}, granularity="channel")), frozenset({64}), torch.float32,
     "llama", "no E5M2 type"),
    (LinearScheme(QuantSpec(**FP8, granularity="channel"), QuantSpec(**FP8 | {"format": "fp8_e5m2"},
                                                                     granularity="token")),
     frozenset({64}), torch.float32, "llama", "no E5M2 type"),
    (LinearScheme(QuantSpec(**NVFP4)), frozenset({64}), torch.float32, "llama",
     "dequantizes NVFP4 weights in bfloat16"),
    (LinearScheme(QuantSpec(**NVFP4)), frozenset({64}), torch.float16, "llama", "a float16 model would reload"),
    (LinearScheme(QuantSpec(**MXFP4), QuantSpec(**MXFP4)), frozenset({64}), torch.float32, "llama",
     "generate_mx_scales"),
    (LinearScheme(QuantSpec(**MXFP8), QuantSpec(**MXFP8)), frozenset({64}), torch.float32, "llama",
     "generate_mx_scales"),
    (LinearScheme(QuantSpec(**NVFP4), QuantSpec(**NVFP4)), frozenset({64}), torch.bfloat16, "llama",
     "static, calibrated global scale"),
    (LinearScheme(QuantSpec(**MXFP4), QuantSpec(**FP8, granularity="token")), frozenset({64}), torch.float32,
     "llama", "into bfloat16 parameters"),
    (LinearScheme(QuantSpec(**MXFP4)), frozenset({64, 80}), torch.float32, "llama",
     "in_features 80 not a multiple of group_size=32"),
    (LinearScheme(QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token"),
                  act_clip_ratio=0.9), frozenset({64}), torch.float32, "llama", "no clip ratio"),
]
MIXED_ASYMMETRIC = (LinearScheme(QuantSpec(bits=3, symmetric=False, group_size=32)),
                    LinearScheme(QuantSpec(bits=5, symmetric=False, group_size=32)))


@pytest.mark.parametrize(("scheme", "widths", "dtype", "model_type", "reason"), REFUSED)
def test_check_refuses_in_one_line(scheme, widths, dtype, model_type, reason):
    with pytest.raises(ExportError) as error:
        EXPORTER.check(ExportPlan((scheme,), widths, dtype, model_type))
    message = str(error.value)
    assert message.startswith("export=compressed_tensors:") and "\n" not in message
    assert reason in message and "; allowed " in message
    if model_type not in ("digits_mlp", "gpt2"):  # the model, not the scheme, is what the format cannot hold
        assert scheme.describe() in message


def test_check_refuses_asymmetric_mixed_precision():
    with pytest.raises(ExportError, match=r"^export=compressed_tensors: w3 g32 asymmetric: 2 asymmetric weight-only "
                                          r"widths: .*first config group.*; allowed symmetric=true"):
        EXPORTER.check(ExportPlan(MIXED_ASYMMETRIC, frozenset({64}), torch.float32, "llama"))
    EXPORTER.check(ExportPlan(tuple(LinearScheme(replace(s.weight, symmetric=True)) for s in MIXED_ASYMMETRIC),
                              frozenset({64}), torch.float32, "llama"))


@pytest.mark.parametrize(("scheme", "dtype"), [
    (LinearScheme(QuantSpec(bits=4, group_size=32, scale_dtype="bfloat16")), torch.bfloat16),
    (LinearScheme(QuantSpec(**NVFP4)), torch.bfloat16),  # MX and NVFP4 scales are codes, not the model's dtype
    (LinearScheme(QuantSpec(**MXFP4)), torch.float16),
    (LinearScheme(QuantSpec(**MXFP8)), torch.bfloat16),
    (LinearScheme(QuantSpec(bits=4, group_size=32), QuantSpec(**FP8, granularity="token")), torch.float32),
    (LinearScheme(QuantSpec(bits=8, granularity="channel", scale_dtype="float16")), torch.float16),
    (LinearScheme(QuantSpec(bits=8, granularity="channel", scale_dtype="bfloat16"),
                  QuantSpec(bits=8, granularity="tensor", scale_dtype="float16"), static_activations=True),
     torch.float32),
])
def test_check_accepts_what_the_model_dtype_holds(scheme, dtype):
    EXPORTER.check(ExportPlan((scheme,), frozenset({64, 96}), dtype, "gemma3"))


def test_what_check_refuses_would_reload_differently(tmp_path, monkeypatch):
    """Written anyway, the refused schemes reload into another model: OPT's per-token activations, a bfloat16
    model's activations, asymmetric mixed precision (dequantized with the first group's widths), a float32 model's
    NVFP4 weights (rounded to bfloat16; written with G = 1 / g, since no G reloads them exactly)."""
    from transformers import CompressedTensorsConfig

    monkeypatch.setattr(CompressedTensorsExporter, "check", lambda self, plan: None)
    monkeypatch.setattr(exporter_module, "nvfp4_scales", lambda name, linear, scheme: (lambda s, g: (s, 1 / g))(
        *nvfp4_factors(linear.weight_scale)))
    w8a8 = {"name": "rtn", "weight": W8_CHANNEL, "activations": A8_TOKEN}
    dequantized = {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    cases = [(calibrated("opt", w8a8), {}),
             (calibrated("llama", w8a8, dtype=torch.bfloat16, scale_dtype="bfloat16"), {}),
             (mixed_precision(symmetric=False), dequantized),
             (calibrated("llama", {"name": "rtn", "weight": NVFP4}), dequantized)]
    for i, (model, kwargs) in enumerate(cases):
        directory = export(model, tmp_path / str(i))
        reloaded = AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
        assert not torch.equal(logits(reloaded), logits(model)), i


def test_mx_weights_with_quantized_activations_do_not_reload(tmp_path, monkeypatch):
    """Written anyway, MXFP4 weights with FP8 activations come back as bfloat16 weights beside float32 inputs."""
    monkeypatch.setattr(CompressedTensorsExporter, "check", lambda self, plan: None)
    model = calibrated("llama", {"name": "rtn", "weight": MXFP4, "activations": FP8 | {"granularity": "token"}})
    with pytest.raises(RuntimeError, match="same dtype"):
        reload(export(model, tmp_path))


def test_mx_activation_scales_differ_from_ocp_mx():
    """compressed-tensors' dynamic MX scale of a block whose max is 7 = 1.75 · 2² is 2 (max rounded up to 8), OCP
    MX's and ptq's 2^(2 − 2) = 1, for E2M1 elements as for E4M3 ones (max 1.75 · 2⁸)."""
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    for fmt, top in (MXFP4, 7.0), (MXFP8, 448.0):
        spec = QuantSpec(**fmt)
        x = torch.full((1, 32), 0.5).index_fill(1, torch.tensor([0]), top)
        ct_scale, _ = compute_dynamic_scales_and_zp(x, quantization_args(spec, dynamic=True), module=None)
        assert minmax_qparams(x, spec)[0].item() == 1.0 and ct_scale.item() == 2.0, fmt["format"]


def test_nvfp4_activations_depend_on_the_whole_input():
    """ptq's NVFP4 activations sit under each input's own tensor scale, so a block quantizes differently beside a
    larger one; under compressed-tensors' static input_global_scale it does not."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    block = torch.linspace(-1, 1, 16)
    inputs = [torch.cat([block, block]).unsqueeze(0), torch.cat([block, 100 * block]).unsqueeze(0)]
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local",
                            scale_dtype=torch.float8_e4m3fn)
    global_scale = torch.tensor([448 * 6 / 100])

    def ct(x: torch.Tensor) -> torch.Tensor:
        scale, zero = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=global_scale)
        return fake_quantize(x, scale, zero, args, global_scale=global_scale)

    first, second = (quantize_dynamic(x, QuantSpec(**NVFP4))[0, :16] for x in inputs)
    assert not torch.equal(first, second)
    assert torch.equal(ct(inputs[0])[0, :16], ct(inputs[1])[0, :16])


def test_compressed_tensors_8_bit_floats_are_e4m3():
    """Why fp8_e5m2 is refused: compressed-tensors' float type of 8 bits is E4M3 only."""
    from compressed_tensors.quantization import QuantizationArgs

    assert QuantizationArgs(num_bits=8, type="float").pytorch_dtype() == torch.float8_e4m3fn


def test_write_refuses_gptq_act_order_without_static_groups(tmp_path):
    model = calibrated("llama", {"name": "gptq", "weight": {**W4_ASYM_G32, "symmetric": True}, "act_order": True})
    with pytest.raises(ExportError, match="^export=compressed_tensors: w4 g32 symmetric act-order: .*g_idx"):
        export(model, tmp_path)
    assert all(isinstance(m, FakeQuantLinear) for m in calibrated_linears(model).values())


def test_from_pretrained_kwargs_of_a_plain_checkpoint_is_empty(tmp_path):
    family_model("llama").save_pretrained(tmp_path)
    assert from_pretrained_kwargs(tmp_path) == {}
