"""GGUF export (ptq.export.gguf): llama.cpp's file holds ptq's integers and scales, and reads back as ptq's model.

Tiny random models (Llama, Mistral, Qwen2, Qwen3, Gemma 3) are calibrated directly (no pipeline), written with the
exporter and read back three ways: gguf-py's reader and dequantizers (every quantized tensor equals
FakeQuantLinear.weight bit for bit for Q4_0 / Q8_0 once the llama q/k row order is undone, Q4_1 within the offset
error the exporter reports), transformers' GGUF loader (equal logits) and, where llama-cpp-python is installed,
llama.cpp itself (logits within its own arithmetic: it quantizes activations to 8 bits for quantized matmuls).
Schemes GGUF cannot hold are refused in one line.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as T
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys, LlamaFileType, TokenType, dequantize
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ptq.affine import expand
from ptq.calibrate import calibrate
from ptq.export import EXPORTERS, ExportContext, ExportError, ExportPlan
from ptq.export.base import calibrated_linears
from ptq.export.gguf import (
    BLOCK_FORMATS,
    FAMILIES,
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    GGUFExporter,
    pack_mxfp4,
    pack_q4_0,
    pack_q4_1,
    pack_q8_0,
    q4_1_offset_error,
    q4_1_step_error,
    reader_field,
    rope_row_order,
)
from ptq.models import mapping_for
from ptq.models.loading import embedded_smollm2
from ptq.spec import LinearScheme, QuantSpec
from ptq.transforms import build_steps

EXPORTER = GGUFExporter()
Q4_G32 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32}
Q8_CHANNEL = {"bits": 8, "symmetric": True, "granularity": "channel"}
Q4_ASYM_G64 = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 64}
W3_TENSOR = {"bits": 3, "symmetric": True, "granularity": "tensor"}
MXFP4 = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32, "format": "mxfp4"}
WEIGHTS = {"q4_0": Q4_G32, "q8_0": Q8_CHANNEL, "q4_1": Q4_ASYM_G64, "w3_tensor": W3_TENSOR, "mxfp4": MXFP4}
EXPECTED_TYPE = {"q4_0": "Q4_0", "q8_0": "Q8_0", "q4_1": "Q4_1", "w3_tensor": "Q4_0", "mxfp4": "MXFP4"}
VOCAB = 288  # the tiny tokenizer's 273 tokens and 15 unused ids
ATTENTION = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**ATTENTION),
    "mistral": lambda: T.MistralConfig(**ATTENTION, head_dim=16),
    "qwen2": lambda: T.Qwen2Config(**ATTENTION),
    # transformers' GGUF loader reads no head_dim for qwen3 and no query_pre_attn_scalar for gemma3: their
    # defaults (128, 256 = head_dim) are what llama.cpp computes with
    "qwen3": lambda: T.Qwen3Config(**ATTENTION, head_dim=128),
    "gemma3_text": lambda: T.Gemma3TextConfig(**ATTENTION, head_dim=256),
}


MERGES = [("Ġ", "1"), ("Ġ1", "2"), ("1", "2"), ("12", "3"), ("'", "S"), ("'", "s"), ("Ċ", "Ċ"), ("Ġ", "Ġ"),
          ("h", "e"), ("Ġ", "t"), ("!", "!"), ("Ġ", "!"), ("e", "'"), ("Ġ", "Ċ"), ("Ġ", "a")]
"""Merges across the places where the pre-tokenizers below split differently (digits, cased contractions, spaces)."""
HF_PRE_TOKENIZERS = {
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
TRICKY = "HE'S He's 123 tokens!!\n\n  12 x 1234567 and  a !!e's\n \n"
"""Tokenized differently by each of the pre-tokenizers above."""


def tiny_tokenizer(pre: str = "gpt-2") -> PreTrainedTokenizerFast:
    """A byte-level BPE: <s>, </s>, the 256 byte symbols and ``MERGES``, split by ``HF_PRE_TOKENIZERS[pre]``."""
    vocab = {token: i for i, token in enumerate(["<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tokenizer.pre_tokenizer = HF_PRE_TOKENIZERS[pre]
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


TOKENIZER = tiny_tokenizer()


@torch.no_grad()
def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **config: Any) -> nn.Module:
    """A random model whose norms and biases are not their init values (a wrong norm shift or bias would show)."""
    torch.manual_seed(seed)
    base = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(type(base)(**{**base.to_diff_dict(), **config})).eval()
    for name, parameter in model.named_parameters():
        if parameter.dim() == 1:
            parameter.normal_(0.3 if "norm" in name else 0.0, 0.3)
    return model.to(dtype)


def samples(vocab: int = VOCAB, n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def calibrated(model: nn.Module, weight: dict[str, Any], method: str = "rtn", **options: Any) -> nn.Module:
    """``model`` calibrated by one step, its scales in float16 (as the pipeline sets them for export=gguf)."""
    steps = build_steps([{"name": method, "weight": weight, **options}], {"name": "minmax"}, "float16")
    calibrate(model, mapping_for(model), samples(model.config.vocab_size), steps, batch_size=2, progress=False)
    return model


def export(model: nn.Module, tmp_path: Path, **context: Any) -> tuple[Path, ExportContext]:
    directory = tmp_path / "export"
    directory.mkdir(parents=True, exist_ok=True)
    ctx = ExportContext(**{"tokenizer": TOKENIZER, "description": "ptq test", **context})
    return EXPORTER.write(model, directory, ctx), ctx


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf_rows(weight: np.ndarray, name: str, config: Any) -> np.ndarray:
    """Undo the llama q/k row order (of the families that have one): the rows in transformers' order."""
    attribute = FAMILIES[config.model_type].rope_rows.get(name.split(".")[-2])
    if attribute is None:
        return weight
    heads = getattr(config, attribute)
    rows = np.empty_like(weight)
    rows[rope_row_order(weight.shape[0], heads)] = weight
    return rows


def file_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file, dequantized by gguf-py, with its ggml type name."""
    return {tensor.name: (tensor.tensor_type.name, np.array(dequantize(tensor.data, tensor.tensor_type)))
            for tensor in GGUFReader(path).tensors}


def gguf_name(hf_name: str, model: nn.Module) -> str:
    from gguf import get_tensor_name_map

    family = FAMILIES[model.config.model_type]
    module, _, leaf = hf_name.rpartition(".")
    return f"{get_tensor_name_map(family.arch, model.config.num_hidden_layers).get_name(module)}.{leaf}"


# ---------------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------------


def random_grid(bits: int, symmetric: bool, rows: int = 8, blocks: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    q = rng.integers(spec.qmin, spec.qmax + 1, size=(rows, blocks, 32))
    scale = rng.uniform(1e-4, 0.1, size=(rows, blocks)).astype(np.float16).astype(np.float32)
    zero = np.zeros_like(scale) if symmetric else rng.integers(0, 2**bits, size=(rows, blocks)).astype(np.float32)
    return q, scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_q4_0_blocks_dequantize_to_s_times_q(bits):
    q, scale, zero = random_grid(bits, True)
    blocks = pack_q4_0(q, scale, zero)
    assert blocks.shape == (8, 6 * 18) and blocks.dtype == np.uint8
    expected = (scale[..., None] * q).reshape(8, -1)
    assert np.array_equal(dequantize(blocks, GGMLQuantizationType.Q4_0), expected)


@pytest.mark.parametrize("bits", [5, 8])
def test_q8_0_blocks_dequantize_to_s_times_q(bits):
    q, scale, zero = random_grid(bits, True)
    expected = (scale[..., None] * q).reshape(8, -1)
    assert np.array_equal(dequantize(pack_q8_0(q, scale, zero), GGMLQuantizationType.Q8_0), expected)


@pytest.mark.parametrize("bits", [2, 4])
def test_q4_1_blocks_within_the_reported_offset_error(bits):
    q, scale, zero = random_grid(bits, False)
    exact = (scale[..., None].astype(np.float64) * (q - zero[..., None])).reshape(8, -1)
    read = dequantize(pack_q4_1(q, scale, zero), GGMLQuantizationType.Q4_1).astype(np.float64)
    steps = np.abs(read - exact) / np.repeat(scale, 32, axis=-1)
    error = q4_1_step_error(scale, zero)
    assert 0 < error <= 15 * 2.0**-11
    assert steps.max() <= error * (1 + 1e-4) + 1e-6 and steps.max() >= error * 0.99


def test_mxfp4_blocks_dequantize_to_e2m1_times_power_of_two():
    rng = np.random.default_rng(0)
    magnitudes = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    values = rng.choice(magnitudes, size=(8, 6, 32)) * rng.choice([-1.0, 1.0], size=(8, 6, 32))
    scale = 2.0 ** rng.integers(-127, 128, size=(8, 6)).astype(np.float32)
    blocks = pack_mxfp4(values, scale, np.zeros_like(scale))
    assert blocks.shape == (8, 6 * 17)
    expected = (scale[..., None].astype(np.float64) * values).astype(np.float32).reshape(8, -1)
    assert np.array_equal(dequantize(blocks, GGMLQuantizationType.MXFP4), expected)
    with pytest.raises(ExportError, match="^export=gguf: an MXFP4 element is not an E2M1 value"):
        pack_mxfp4(values + 0.25, scale, np.zeros_like(scale))


def test_a_scale_off_the_fp16_grid_is_refused_not_rounded():
    q, scale, zero = random_grid(4, True)
    with pytest.raises(ExportError, match="^export=gguf: a scale is not an fp16 value"):
        pack_q4_0(q, scale * (1 + 2.0**-15), zero)


def test_rope_row_order_pairs_the_rotated_halves():
    # head 0 of 8 rows: HF rotates (0, 4), (1, 5), ...; llama.cpp adjacent rows (0, 1), (2, 3), ...
    assert rope_row_order(16, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def assert_file_holds_ptq_weights(path: Path, model: nn.Module, expected_type: str, context: ExportContext) -> None:
    """Every quantized tensor, dequantized by gguf-py and put back in HF row order, is FakeQuantLinear.weight (Q4_1:
    within the reported step error); every other parameter is stored as it is (Gemma's norms as 1 + w)."""
    tensors = file_tensors(path)
    linears = calibrated_linears(model)
    error = context.extra["q4_1_offset_error_steps"]
    assert error == q4_1_offset_error(model)
    for name, linear in linears.items():
        tensor = gguf_name(f"{name}.weight", model)
        qtype, weight = tensors[tensor]
        assert qtype == expected_type, name
        weight = torch.from_numpy(hf_rows(weight.reshape(linear.out_features, -1), tensor, model.config))
        if qtype == "Q4_1":
            steps = (weight - linear.weight.float()).abs() / expand(linear.weight_scale, linear.weight_spec,
                                                                     linear.in_features)
            assert 0 < error < 15 * 2.0**-11 and steps.max() <= error * (1 + 1e-4) + 1e-6, name
        else:
            assert torch.equal(weight.to(linear.weight.dtype), linear.weight), name
    shift = FAMILIES[model.config.model_type].norm_shift
    for name, parameter in model.named_parameters():
        if name.rpartition(".")[0] in linears and name.endswith(".weight"):
            continue
        qtype, stored = tensors[gguf_name(name, model)]
        expected = parameter.detach().float() + (shift if name.endswith("norm.weight") else 0.0)
        stored = torch.from_numpy(hf_rows(stored.reshape(expected.shape), gguf_name(name, model), model.config))
        assert qtype == ("F32" if parameter.dim() == 1 else {torch.float32: "F32", torch.float16: "F16",
                                                             torch.bfloat16: "BF16"}[parameter.dtype]), name
        assert torch.equal(stored, expected), name


@pytest.mark.parametrize("scheme", list(WEIGHTS))
def test_file_holds_ptq_integers_and_scales(scheme, tmp_path):
    model = calibrated(tiny_model("llama"), WEIGHTS[scheme])
    path, context = export(model, tmp_path)
    assert path == tmp_path / "export" / "model.gguf"
    assert_file_holds_ptq_weights(path, model, EXPECTED_TYPE[scheme], context)
    fields = GGUFReader(path).fields
    assert fields[Keys.General.FILE_TYPE].contents() == BLOCK_FORMATS[
        GGMLQuantizationType[EXPECTED_TYPE[scheme]]].file_type


def test_gptq_static_groups_act_order_is_written_exactly(tmp_path):
    model = calibrated(tiny_model("llama"), Q4_G32, "gptq", act_order=True,
                       static_groups=True)
    path, context = export(model, tmp_path)
    assert_file_holds_ptq_weights(path, model, "Q4_0", context)


RELOADED = [*((family, "q4_0") for family in CONFIGS), ("llama", "q8_0"), ("llama", "q4_1"), ("llama", "mxfp4"),
            ("qwen2", "q4_1"), ("gemma3_text", "q4_1")]


@pytest.mark.parametrize(("family", "scheme"), RELOADED)
def test_transformers_reads_back_ptq_logits(family, scheme, tmp_path):
    model = calibrated(tiny_model(family), WEIGHTS[scheme])
    path, context = export(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    x = samples()
    expected, read = logits(model, x), logits(reloaded, x)
    if scheme == "q4_1":
        assert 0 < relative_error(read, expected) < 1e-2
    else:
        torch.testing.assert_close(read, expected, rtol=0, atol=1e-6)
    for name, linear in calibrated_linears(model).items():
        weight = reloaded.get_submodule(name).weight
        assert scheme == "q4_1" or torch.equal(weight, linear.weight), name
    if family == "gemma3_text":
        assert_file_holds_ptq_weights(path, model, EXPECTED_TYPE[scheme], context)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_keep_their_dtype(dtype, tmp_path):
    model = calibrated(tiny_model("qwen2", dtype), Q4_G32)
    path, context = export(model, tmp_path)
    assert_file_holds_ptq_weights(path, model, "Q4_0", context)
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    ours = dict(model.named_parameters())
    for name, parameter in reloaded.named_parameters():
        assert parameter.dtype == dtype and torch.equal(parameter, ours[name]), name


def test_tokenizer_fields_from_a_hf_tokenizer(tmp_path):
    path, _ = export(calibrated(tiny_model("qwen2"), Q4_G32), tmp_path)
    fields = GGUFReader(path).fields
    tokens = fields[Keys.Tokenizer.LIST].contents()
    vocab = TOKENIZER.get_vocab()
    assert len(tokens) == VOCAB and all(tokens[i] == token for token, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), VOCAB)]
    types = fields[Keys.Tokenizer.TOKEN_TYPE].contents()
    assert types[:3] == [TokenType.CONTROL, TokenType.CONTROL, TokenType.NORMAL]
    assert set(types[len(vocab):]) == {TokenType.UNUSED}
    assert fields[Keys.Tokenizer.MERGES].contents() == [f"{a} {b}" for a, b in MERGES]
    assert fields[Keys.Tokenizer.MODEL].contents() == "gpt2" and fields[Keys.Tokenizer.PRE].contents() == "gpt-2"
    assert fields[Keys.Tokenizer.BOS_ID].contents() == 0 and fields[Keys.Tokenizer.EOS_ID].contents() == 1
    assert fields[Keys.Tokenizer.ADD_BOS].contents() is False
    assert fields[Keys.General.DESCRIPTION].contents() == "ptq test"
    assert fields[Keys.General.ARCHITECTURE].contents() == "qwen2"


@pytest.mark.slow
def test_source_gguf_metadata_is_carried_and_file_fields_renewed(tmp_path):
    """The pipeline's random Llama: SmolLM2's tokenizer and provenance, the tiny model's own architecture fields."""
    source = embedded_smollm2()
    source_path = Path(source.location) / source.gguf_file
    model = calibrated(tiny_model("llama", vocab_size=49152), Q4_G32)
    path, _ = export(model, tmp_path, tokenizer=None, source_gguf=source_path)
    theirs, ours = GGUFReader(source_path).fields, GGUFReader(path).fields
    for key in [k for k in theirs if k.startswith("tokenizer.")] + [Keys.General.NAME, Keys.General.LICENSE]:
        assert ours[key].contents() == theirs[key].contents(), key
    assert theirs[Keys.General.FILE_TYPE].contents() == LlamaFileType.MOSTLY_Q4_1
    assert ours[Keys.General.FILE_TYPE].contents() == LlamaFileType.MOSTLY_Q4_0
    # the architecture fields describe this model, not SmolLM2-135M
    assert ours["llama.block_count"].contents() == 2 and ours["llama.embedding_length"].contents() == 64
    assert ours["llama.context_length"].contents() == model.config.max_position_embeddings
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    text = b"Quantized 2048 tokens, then 7 more."
    ids = []
    for file in (source_path, path):  # SmolLM2's tokenizer ("smollm" pre-tokenizer) as llama.cpp reads it
        llm = llama_cpp.Llama(model_path=str(file), vocab_only=True, verbose=False)
        ids.append(llm.tokenize(text, add_bos=False))
        llm.close()
    assert ids[0] == ids[1] and len(ids[0]) > 8


def metadata_copy(path: Path, target: Path, extra: dict[str, tuple[Any, GGUFValueType]]) -> Path:
    """A GGUF file of metadata only: the fields of ``path`` with ``extra`` (value, type) set."""
    fields = {key: reader_field(field) for key, field in GGUFReader(path).fields.items()
              if not key.startswith("GGUF.") and key != Keys.General.ARCHITECTURE and key not in extra}
    writer = GGUFWriter(target, GGUFReader(path).fields[Keys.General.ARCHITECTURE].contents())
    for field in fields.values():
        writer.add_key_value(field.key, field.value, field.type, field.sub_type)
    for key, (value, value_type) in extra.items():
        writer.add_key_value(key, value, value_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_a_source_describing_this_model_passes_on_its_other_architecture_fields(tmp_path):
    model = calibrated(tiny_model("llama"), Q4_G32)
    first, _ = export(model, tmp_path / "first")
    source = metadata_copy(first, tmp_path / "source.gguf", {
        Keys.General.NAME: ("the source", GGUFValueType.STRING),
        Keys.General.DESCRIPTION: ("the source's run", GGUFValueType.STRING),
        Keys.Rope.SCALING_FINETUNED.format(arch="llama"): (True, GGUFValueType.BOOL)})
    path, _ = export(model, tmp_path / "same", tokenizer=None, source_gguf=source)
    fields = GGUFReader(path).fields
    assert fields["llama.rope.scaling.finetuned"].contents() is True
    assert fields[Keys.General.NAME].contents() == "the source"
    assert fields[Keys.General.DESCRIPTION].contents() == "ptq test"
    assert fields[Keys.Tokenizer.LIST].contents() == GGUFReader(first).fields[Keys.Tokenizer.LIST].contents()
    deeper = calibrated(tiny_model("llama", num_hidden_layers=3), Q4_G32)
    path, _ = export(deeper, tmp_path / "other", tokenizer=None, source_gguf=source)
    fields = GGUFReader(path).fields
    assert "llama.rope.scaling.finetuned" not in fields and fields["llama.block_count"].contents() == 3
    assert fields[Keys.General.NAME].contents() == "the source"
    with pytest.raises(ExportError, match=f"^export=gguf: the tokenizer has {VOCAB} tokens, the embedding 300 rows"):
        export(calibrated(tiny_model("llama", vocab_size=300), Q4_G32), tmp_path / "wide", tokenizer=None,
               source_gguf=source)


def test_write_leaves_the_model_unchanged(tmp_path):
    model = calibrated(tiny_model("llama"), Q4_G32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    reference = logits(model, samples())
    export(model, tmp_path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(module is modules[name] for name, module in model.named_modules())
    assert torch.equal(logits(model, samples()), reference)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------------

F16 = "float16"
W4 = QuantSpec(bits=4, group_size=32, scale_dtype=F16)
REFUSED = [
    (LinearScheme(W4, QuantSpec(bits=8, granularity="token")), "llama", "a8 token dynamic: llama.cpp quantizes"),
    (LinearScheme(W4, act_order=True), "llama", "act-order: act-order without static groups"),
    (LinearScheme(QuantSpec(bits=8, granularity="channel", scale_dtype=F16), QuantSpec(bits=8, granularity="token"),
                  outliers=True), "llama", "fp16 outliers: LLM.int8()"),
    (LinearScheme(QuantSpec(bits=4, group_size=48, scale_dtype=F16)), "llama", "g48 symmetric: group_size=48"),
    (LinearScheme(QuantSpec(bits=8, symmetric=False, granularity="channel", scale_dtype=F16)), "llama",
     "w8 channel asymmetric: no ggml block holds 8-bit asymmetric"),
    (LinearScheme(QuantSpec(bits=4, group_size=32, scale_dtype="float32")), "llama",
     "scale_dtype=float32 scales are not the fp16 d"),
    (LinearScheme(QuantSpec(bits=4, group_size=32, scale_dtype="bfloat16")), "llama", "scale_dtype=bfloat16"),
    (LinearScheme(QuantSpec(bits=8, granularity="channel", format="fp8_e4m3", scale_dtype=F16)), "llama",
     "no ggml block holds format=fp8_e4m3 elements"),
    (LinearScheme(QuantSpec(bits=4, group_size=16, format="nvfp4", scale_dtype=F16)), "llama",
     "no ggml block holds format=nvfp4 elements; allowed Q4_0 (symmetric int ≤ 4 bits), Q4_1 (asymmetric int ≤ 4 "
     "bits), Q8_0 (symmetric int ≤ 8 bits), MXFP4 (format=mxfp4)"),
    (LinearScheme(W4), "opt", "model_type='opt' is not a family"),
    (LinearScheme(W4), "digits_mlp", "model_type='digits_mlp'"),
    (LinearScheme(W4), "gemma3", "model_type='gemma3'"),
]


@pytest.mark.parametrize(("scheme", "model_type", "message"), REFUSED)
def test_refused_schemes_fail_in_one_line(scheme, model_type, message):
    with pytest.raises(ExportError) as error:
        EXPORTER.check(ExportPlan((scheme,), frozenset({64, 96}), torch.float32, model_type))
    text = str(error.value)
    assert text.startswith("export=gguf: ") and "\n" not in text and "; allowed " in text
    assert message in text, text


def test_rows_not_a_multiple_of_32_are_refused():
    with pytest.raises(ExportError, match=r"^export=gguf: in_features 40 not a multiple of 32.*allowed"):
        EXPORTER.check(ExportPlan((LinearScheme(W4),), frozenset({64, 40}), torch.float32, "llama"))


@pytest.mark.parametrize("weight", [Q4_G32, Q8_CHANNEL, Q4_ASYM_G64, W3_TENSOR, {**MXFP4, "scale_dtype": "float32"},
                                    {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64}])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_supported_schemes_pass_check(weight, model_type):
    scheme = LinearScheme(QuantSpec(**{"scale_dtype": F16, **weight}))
    EXPORTER.check(ExportPlan((scheme,), frozenset({64, 96}), torch.float16, model_type))


def test_registered_under_its_name():
    assert isinstance(EXPORTERS["gguf"], GGUFExporter)


def test_write_refuses_what_calibration_made_unwritable(tmp_path):
    model = calibrated(tiny_model("llama"), Q4_G32, "gptq", act_order=True)
    with pytest.raises(ExportError, match="^export=gguf: w4 g32 symmetric act-order: act-order without static"):
        export(model, tmp_path)
    model = calibrated(tiny_model("llama"), {**Q4_G32, "scale_dtype": "float32"})
    with pytest.raises(ExportError, match="^export=gguf: w4 g32 symmetric: scale_dtype=float32"):
        export(model, tmp_path)


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tmp_path):
    word_level = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")),
                                         unk_token="a")
    model = calibrated(tiny_model("llama"), Q4_G32)
    with pytest.raises(ExportError, match="^export=gguf: the WordLevel tokenizer .* allowed byte-level BPE"):
        export(model, tmp_path, tokenizer=word_level)
    with pytest.raises(ExportError, match="^export=gguf: no fast .*tokenizer"):
        export(model, tmp_path, tokenizer=None)


def test_rope_scalings_llama_cpp_needs_more_than_fields_for_are_refused(tmp_path):
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = calibrated(tiny_model("llama", rope_parameters=llama3), Q4_G32)
    with pytest.raises(ExportError, match="^export=gguf: rope_type=llama3 is not written.*allowed rope_type default, "
                                          "linear$"):
        export(model, tmp_path)


def test_gemma3_unlike_llama_cpp_graph_is_refused(tmp_path):
    model = calibrated(tiny_model("gemma3_text", query_pre_attn_scalar=64), Q4_G32)
    with pytest.raises(ExportError, match=r"^export=gguf: .*query_pre_attn_scalar=64 \(llama.cpp: 256\)"):
        export(model, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------------------------------


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(tokens), vocab] for one sequence, through llama-cpp-python on the CPU, with a float32
    KV cache (its default, float16, rounds keys and values)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                        "llama-cpp-python builds it from source)")
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, type_k=f32, type_v=f32,
                          verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


GRAPH_TOLERANCE = {"gemma3_text": 1e-3}  # ggml's GELU reads an fp16 table
QUANTIZED_TOLERANCE = {"gemma3_text": 5e-2}
SHARP = {"initializer_range": 0.1}  # q/k weights large enough that attention (and so RoPE) shows in the logits


@pytest.mark.parametrize("family", list(CONFIGS))
def test_llama_cpp_computes_the_unquantized_model(family, tmp_path):
    """Names, row order, norms and hyper-parameters: with no quantized Linear (F32 matrices, no activation rounding)
    llama.cpp's logits are the model's to float32 rounding (measured 3e-7 relative; Gemma 3 3e-4)."""
    model = tiny_model(family, **SHARP)
    path, _ = export(model, tmp_path)
    x = samples(n=1, length=24)
    read = torch.from_numpy(llama_cpp_logits(path, x[0].tolist()))
    assert relative_error(read, logits(model, x)[0]) < GRAPH_TOLERANCE.get(family, 1e-5)


@pytest.mark.parametrize(("family", "change"), [("llama", {"rope_rows": {}}), ("gemma3_text", {"norm_shift": 0.0})])
def test_llama_cpp_notices_a_missing_convention(family, change, tmp_path, monkeypatch):
    """The test above can fail: without the q/k row order (measured 6e-2 relative) or Gemma's 1 + w norms (0.9),
    llama.cpp computes another model."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    monkeypatch.setitem(FAMILIES, family, replace(FAMILIES[family], **change))
    model = tiny_model(family, **SHARP)
    path, _ = export(model, tmp_path)
    x = samples(n=1, length=24)
    assert relative_error(torch.from_numpy(llama_cpp_logits(path, x[0].tolist())), logits(model, x)[0]) > 1e-2


def test_llama_cpp_applies_linear_rope_scaling(tmp_path):
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, **SHARP)
    path, _ = export(model, tmp_path)
    assert GGUFReader(path).fields["llama.rope.scaling.factor"].contents() == 4.0
    x = samples(n=1, length=24)
    assert relative_error(torch.from_numpy(llama_cpp_logits(path, x[0].tolist())), logits(model, x)[0]) < 1e-5


LLAMA_CPP = [("llama", "q4_0"), ("llama", "q8_0"), ("llama", "q4_1"), ("llama", "mxfp4"), ("llama", "w3_tensor"),
             ("mistral", "q4_0"), ("qwen2", "q4_1"), ("qwen3", "q8_0"), ("gemma3_text", "q4_0")]


@pytest.mark.parametrize(("family", "scheme"), LLAMA_CPP)
def test_llama_cpp_logits_match(family, scheme, tmp_path):
    """Quantized matmuls: llama.cpp rounds the activations to Q8 blocks (per 32, 8 bits), ptq keeps them in float;
    measured 2.5e-3 relative (Llama, Mistral), 6-7e-3 (Qwen2, Qwen3), 2.3e-2 (Gemma 3, whose embeddings are scaled
    by √hidden); a wrong block layout or row order gives errors of order 1."""
    model = calibrated(tiny_model(family), WEIGHTS[scheme])
    path, _ = export(model, tmp_path)
    x = samples(n=1, length=24)
    read = torch.from_numpy(llama_cpp_logits(path, x[0].tolist()))
    assert relative_error(read, logits(model, x)[0]) < QUANTIZED_TOLERANCE.get(family, 1e-2)


@pytest.mark.parametrize("pre", list(HF_PRE_TOKENIZERS))
def test_pre_tokenizers_are_the_ones_llama_cpp_names(pre, tmp_path):
    tokenizer = tiny_tokenizer(pre)
    path, _ = export(calibrated(tiny_model("llama"), Q4_G32), tmp_path, tokenizer=tokenizer)
    assert GGUFReader(path).fields[Keys.Tokenizer.PRE].contents() == pre
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(TRICKY.encode(), add_bos=False) == tokenizer.encode(TRICKY, add_special_tokens=False)
    finally:
        llm.close()


def test_the_tricky_text_tells_the_pre_tokenizers_apart():
    ids = [tiny_tokenizer(pre).encode(TRICKY, add_special_tokens=False) for pre in HF_PRE_TOKENIZERS]
    assert len({tuple(i) for i in ids}) == len(HF_PRE_TOKENIZERS)


def test_a_copy_of_the_model_exports_the_same_bytes(tmp_path):
    model = calibrated(tiny_model("qwen2"), Q4_G32)
    first, _ = export(model, tmp_path / "a")
    second, _ = export(copy.deepcopy(model), tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()


def test_q8_0_embeddings_are_rounded_as_llama_cpp_rounds_them(tmp_path):
    model = calibrated(tiny_model("llama"), {"bits": 4, "granularity": "group", "group_size": 32})
    path, _ = export(model, tmp_path, options={"embeddings": "q8_0"})
    kind, table = file_tensors(path)["token_embd.weight"]
    original = model.get_input_embeddings().weight.detach().float().numpy()
    d = np.abs(original.reshape(original.shape[0], -1, 32)).max(axis=-1) / 127
    assert kind == "Q8_0"
    assert np.all(np.abs(table - original).reshape(d.shape + (32,)) <= d[..., None] * 0.5 + 1e-6)
    assert not np.array_equal(table, original)
    exact, _ = export(model, tmp_path / "exact")
    assert path.stat().st_size < exact.stat().st_size
