"""llama.cpp's GGUF file: a calibrated causal LM whose quantized Linears are ggml blocks built from ptq's integers.

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, written with gguf-py 0.19's ``GGUFWriter``) is
a header of typed key-value metadata (architecture hyper-parameters, tokenizer, provenance) and named tensors. A
quantized tensor is a sequence of ggml blocks, each 32 consecutive weights of one row (ggml-common.h, checked against
gguf-py's ``quants.py`` dequantizers):

- ``Q4_0`` (18 bytes): fp16 d, then 16 bytes of nibbles; weight j is d · (n_j − 8) with n_j the low nibble of byte
  j for j < 16 and the high nibble of byte j − 16 otherwise;
- ``Q4_1`` (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles as in Q4_0; weight j is d · n_j + m;
- ``Q8_0`` (34 bytes): fp16 d, then 32 int8 q_j; weight j is d · q_j;
- ``MXFP4`` (17 bytes): an E8M0 byte e, then nibbles as in Q4_0 holding E2M1 codes (sign in bit 3); weight j is
  E2M1(n_j) · 2^(e − 127) (OCP Microscaling Formats v1.0; ggml stores its table doubled and the scale halved).

Every block is written from what calibration decided — ``FakeQuantLinear.weight_int``, ``weight_scale``,
``weight_zero`` — and nothing is rounded again (gguf-py's ``quantize`` picks its own scales and is never called):

- symmetric integers of ≤ 4 bits (q ∈ [−2^(b−1), 2^(b−1) − 1], s · q): Q4_0 with n = q + 8, d = s — exact;
- symmetric integers of 5..8 bits: Q8_0 with d = s — exact;
- asymmetric integers of ≤ 4 bits (q ∈ [0, 2^b − 1], s · (q − z)): Q4_1 with n = q, d = s and m = −s · z rounded to
  fp16 — near exact: ``q4_1_offset_error`` is the largest |m − (−s · z)| / s, in quantization steps (≤ 15 · 2^−11);
- ``format=mxfp4`` (E2M1 elements, one E8M0 scale per 32, ``ptq.formats``): MXFP4 with e = log2 s + 127 — exact.

A block needs one scale, so every group (and a row's width) must be a multiple of 32 — a group of 64 is two blocks
with the same d — and the integer blocks' scales must be fp16 values already (``scale_dtype=float16``);
per-channel and per-tensor scales are repeated in every block of their row. Everything else (embeddings, norms,
biases, an unquantized head) is written in floating point: 1-D tensors F32, matrices in the model's dtype (F32, F16
or BF16).

Families follow llama.cpp's converter (convert_hf_to_gguf.py): tensor names from gguf-py's ``TensorNameMap``; the
``llama`` architecture (Llama, SmolLM2, Mistral) rotates pairs of adjacent q/k rows where transformers rotates
halves, so the rows of every head of q_proj and k_proj are reordered (integers, scales and zero points alike, which
is exact); Gemma 3's RMSNorm multiplies by (1 + w), llama.cpp's by w, so its norms are stored as 1 + w (in float32,
as transformers computes it). llama.cpp runs Mistral without a sliding window, as its converter writes it.

Metadata: the architecture fields come from the model's HF config. When the model came from a GGUF file
(``ExportContext.source_gguf``), its ``general.*`` and ``tokenizer.*`` fields are carried over (and its other
architecture fields, if it describes this very model), except the file type, quantization version and alignment,
which describe the new file. Otherwise the tokenizer fields are built from ``ExportContext.tokenizer``: byte-level BPE
tokenizers (tokens, token types, merges, special ids) whose pre-tokenizer llama.cpp knows by name.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
    ReaderField,
    TokenType,
    get_tensor_name_map,
)
from torch import nn

from ptq.affine import expand
from ptq.export.base import ExportContext, ExportError, ExportPlan, calibrated_linears, linear_scheme, refuse
from ptq.nn import FakeQuantLinear
from ptq.spec import LinearScheme, QuantSpec

NAME = "gguf"
FILE_NAME = "model.gguf"
BLOCK = 32
"""Weights per Q4_0 / Q4_1 / Q8_0 / MXFP4 block (``gguf.GGML_QUANT_SIZES``)."""
SCALE_DTYPE = "float16"

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Blocks: pure numpy, from codes q [rows, blocks, 32] and per-block scale s and zero point z [rows, blocks]
# ---------------------------------------------------------------------------------------------------------------------


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """The little-endian fp16 bytes [..., 2] of ``values``, which must be fp16 numbers already (ptq's scales are:
    ``scale_dtype=float16``); anything else would be rounded here, and is refused."""
    half = values.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), values.astype(np.float32)):
        raise ExportError(f"export={NAME}: a scale is not an fp16 value; allowed scale_dtype={SCALE_DTYPE}")
    return half.astype("<f2")[..., None].view(np.uint8)


def nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes [..., 32] into 16 bytes [..., 16]: code j in the low nibble of byte j, code 16 + j in its
    high nibble (ggml's ``block_q4_0.qs``)."""
    codes = codes.astype(np.uint8)
    return codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2:] << 4)


def pack_q4_0(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Q4_0 blocks [rows, blocks · 18] of symmetric integers q ∈ [−8, 7]: d = s, nibble n = q + 8."""
    return np.concatenate([fp16_bytes(scale), nibbles(q + 8)], axis=-1).reshape(q.shape[0], -1)


def pack_q4_1(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Q4_1 blocks [rows, blocks · 20] of asymmetric integers q ∈ [0, 15]: d = s, m = −s · z in fp16, n = q."""
    return np.concatenate([fp16_bytes(scale), fp16_bytes(q4_1_minimum(scale, zero)), nibbles(q)],
                          axis=-1).reshape(q.shape[0], -1)


def pack_q8_0(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Q8_0 blocks [rows, blocks · 34] of symmetric integers q ∈ [−128, 127]: d = s, int8 q."""
    return np.concatenate([fp16_bytes(scale), q.astype(np.int8).view(np.uint8)], axis=-1).reshape(q.shape[0], -1)


def q4_1_minimum(scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Q4_1's offset m: −s · z (exact in float32: an fp16 s times an integer below 16) rounded to fp16."""
    return (-scale.astype(np.float32) * zero.astype(np.float32)).astype(np.float16).astype(np.float32)


def q4_1_step_error(scale: np.ndarray, zero: np.ndarray) -> float:
    """The largest |m − (−s · z)| / s of Q4_1 blocks: how far, in quantization steps, the file's weights
    d · q + m lie from ptq's s · (q − z) (0 for an empty input)."""
    if scale.size == 0:
        return 0.0
    exact = -scale.astype(np.float64) * zero.astype(np.float64)
    return float(np.max(np.abs(q4_1_minimum(scale, zero) - exact) / scale.astype(np.float64)))


E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
"""|x| of the eight non-negative E2M1 codes (ggml's ``kvalues_mxfp4`` hold them doubled); bit 3 is the sign."""
E8M0_BIAS = 127


def e8m0_bytes(scale: np.ndarray) -> np.ndarray:
    """The E8M0 bytes [..., 1] of power-of-two scales 2^k, k ∈ [−127, 127]: k + 127 (OCP MX v1.0 Table 3)."""
    exponent = np.log2(scale.astype(np.float64))
    if not np.array_equal(exponent, np.round(exponent)) or np.abs(exponent).max(initial=0) > E8M0_BIAS:
        raise ExportError(f"export={NAME}: an MXFP4 scale is not a power of two in E8M0's range; allowed format=mxfp4 "
                          "scales (ptq.formats.e8m0_scale)")
    return (exponent + E8M0_BIAS).astype(np.uint8)[..., None]


def e2m1_codes(values: np.ndarray) -> np.ndarray:
    """The 4-bit E2M1 codes of E2M1 values: sign in bit 3, the magnitude's index in ``E2M1_MAGNITUDES`` below it."""
    magnitude = np.abs(values).astype(np.float32)
    index = np.searchsorted(E2M1_MAGNITUDES, magnitude).clip(0, len(E2M1_MAGNITUDES) - 1)
    if not np.array_equal(E2M1_MAGNITUDES[index], magnitude):
        raise ExportError(f"export={NAME}: an MXFP4 element is not an E2M1 value; allowed format=mxfp4 elements")
    return index + 8 * np.signbit(values)


def pack_mxfp4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """MXFP4 blocks [rows, blocks · 17] of E2M1 elements under a power-of-two scale: E8M0 byte, then the nibbles as
    in Q4_0; element j is E2M1(n_j) · 2^(e − 127)."""
    return np.concatenate([e8m0_bytes(scale), nibbles(e2m1_codes(q))], axis=-1).reshape(q.shape[0], -1)


@dataclass(frozen=True)
class BlockFormat:
    """A ggml block type: the grids it holds (``format``, symmetry, up to ``max_bits``), whether its scale is an fp16
    d (the others are E8M0), and how its blocks are built from a grid's codes, scales and zero points."""

    qtype: GGMLQuantizationType
    format: str
    symmetric: bool
    max_bits: int
    pack: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    file_type: LlamaFileType
    fp16_scales: bool = True

    def holds(self, spec: QuantSpec) -> bool:
        return spec.format == self.format and spec.symmetric == self.symmetric and spec.bits <= self.max_bits

    def describe(self) -> str:
        if self.format != "int":
            return f"{self.qtype.name} (format={self.format})"
        return f"{self.qtype.name} ({'symmetric' if self.symmetric else 'asymmetric'} int ≤ {self.max_bits} bits)"


BLOCK_FORMATS: dict[GGMLQuantizationType, BlockFormat] = {
    fmt.qtype: fmt for fmt in (
        BlockFormat(GGMLQuantizationType.Q4_0, "int", True, 4, pack_q4_0, LlamaFileType.MOSTLY_Q4_0),
        BlockFormat(GGMLQuantizationType.Q4_1, "int", False, 4, pack_q4_1, LlamaFileType.MOSTLY_Q4_1),
        BlockFormat(GGMLQuantizationType.Q8_0, "int", True, 8, pack_q8_0, LlamaFileType.MOSTLY_Q8_0),
        BlockFormat(GGMLQuantizationType.MXFP4, "mxfp4", True, 4, pack_mxfp4, LlamaFileType.MOSTLY_MXFP4_MOE,
                    fp16_scales=False),
    )
}
"""In order of preference: the first format that holds a grid is the one it is written in."""


def block_format(spec: QuantSpec) -> BlockFormat | None:
    """The smallest ggml block that holds ``spec``'s grid exactly, or None."""
    return next((fmt for fmt in BLOCK_FORMATS.values() if fmt.holds(spec)), None)


def block_grid(linear: FakeQuantLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A calibrated Linear's codes [out, blocks, 32] (as float32: integers, or E2M1 values) and each block's scale and
    zero point [out, blocks] (the group's; every block lies inside one group when groups and rows are multiples of
    32)."""
    spec, rows, columns = linear.weight_spec, linear.out_features, linear.in_features
    per_block = [expand(param.detach().float().cpu(), spec, columns).expand(rows, columns)[:, ::BLOCK].numpy()
                 for param in (linear.weight_scale, linear.weight_zero)]
    q = linear.weight_int.detach().cpu().float().numpy().reshape(rows, columns // BLOCK, BLOCK)
    return q, per_block[0], per_block[1]


def q4_1_offset_error(model: nn.Module) -> float:
    """The largest Q4_1 offset error, in quantization steps, of every Linear of ``model`` that the export writes as
    Q4_1 (0 when none is): max |m_fp16 − (−s · z)| / s. Q4_0 and Q8_0 blocks are exact."""
    errors = [q4_1_step_error(*block_grid(linear)[1:]) for linear in calibrated_linears(model).values()
              if block_format(linear.weight_spec) is BLOCK_FORMATS[GGMLQuantizationType.Q4_1]]
    return max(errors, default=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# What check refuses
# ---------------------------------------------------------------------------------------------------------------------

Refusal = tuple[str, str] | None
"""(reason, allowed), or None when the rule lets a scheme through."""


def outliers_rule(scheme: LinearScheme) -> Refusal:
    if scheme.outliers:
        return ("LLM.int8() multiplies outlier columns it finds at run time in full precision, which no ggml block "
                "describes", "weight-only rtn, gptq, awq and mixed methods")
    return None


def activations_rule(scheme: LinearScheme) -> Refusal:
    if scheme.activations is not None:
        return ("llama.cpp quantizes activations its own way (Q8 per block of 32), not with ptq's activation "
                "quantizer", "weight-only schemes (no activations)")
    return None


def act_order_rule(scheme: LinearScheme) -> Refusal:
    if scheme.act_order:
        return ("act-order without static groups needs a per-column group index (g_idx), which ggml blocks of 32 "
                "consecutive weights cannot hold", "act_order=false, or act_order with static_groups=true")
    return None


def grid_rule(scheme: LinearScheme) -> Refusal:
    weight = scheme.weight
    if block_format(weight) is None:
        grid = f"{weight.bits}-bit {'symmetric' if weight.symmetric else 'asymmetric'} integers" \
            if weight.format == "int" else f"format={weight.format} elements"
        return f"no ggml block holds {grid}", ", ".join(fmt.describe() for fmt in BLOCK_FORMATS.values())
    return None


def scale_dtype_rule(scheme: LinearScheme) -> Refusal:
    weight = scheme.weight
    if block_format(weight).fp16_scales and weight.scale_dtype != SCALE_DTYPE:
        return (f"scale_dtype={weight.scale_dtype} scales are not the fp16 d of ggml blocks",
                f"scale_dtype={SCALE_DTYPE}")
    return None


def group_rule(scheme: LinearScheme) -> Refusal:
    weight = scheme.weight
    if weight.granularity == "group" and weight.group_size % BLOCK:
        return (f"group_size={weight.group_size} is not a multiple of the ggml block ({BLOCK} weights, one scale)",
                f"group_size a multiple of {BLOCK}, granularity=channel or granularity=tensor")
    return None


SCHEME_RULES: tuple[Callable[[LinearScheme], Refusal], ...] = (
    outliers_rule, activations_rule, act_order_rule, grid_rule, scale_dtype_rule, group_rule)
"""In order: each rule may assume the earlier ones held (``scale_dtype_rule`` that a block format holds the grid)."""


def scheme_refusal(scheme: LinearScheme) -> Refusal:
    """The first rule that ``scheme`` breaks, as (reason, allowed), or None when GGUF holds it exactly."""
    return next((refusal for refusal in (rule(scheme) for rule in SCHEME_RULES) if refusal is not None), None)


# ---------------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One GGUF key-value pair (``sub_type``: the element type of an array)."""

    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


def uint32(key: str, value: int) -> Field:
    return Field(key, int(value), GGUFValueType.UINT32)


def float32(key: str, value: float) -> Field:
    return Field(key, float(value), GGUFValueType.FLOAT32)


def string(key: str, value: str) -> Field:
    return Field(key, value, GGUFValueType.STRING)


def flag(key: str, value: bool) -> Field:
    return Field(key, bool(value), GGUFValueType.BOOL)


def array(key: str, values: Sequence[Any], sub_type: GGUFValueType) -> Field:
    return Field(key, list(values), GGUFValueType.ARRAY, sub_type)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope(config: Any) -> dict[str, Any]:
    """The rotary parameters of the full-attention layers (Gemma 3 keeps one set per layer type)."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    return dict(parameters.get("full_attention", parameters))


def linear_rope_fields(parameters: dict[str, Any], arch: str) -> list[Field]:
    return [string(Keys.Rope.SCALING_TYPE.format(arch=arch), "linear"),
            float32(Keys.Rope.SCALING_FACTOR.format(arch=arch), parameters["factor"])]


ROPE_SCALINGS: dict[str, Callable[[dict[str, Any], str], list[Field]]] = {
    "default": lambda parameters, arch: [],
    "linear": linear_rope_fields,
}
"""transformers' ``rope_type`` → llama.cpp's rope-scaling fields (llama3 and yarn need more than fields: refused)."""


def rope_scaling_fields(parameters: dict[str, Any], arch: str) -> list[Field]:
    kind = parameters.get("rope_type", "default")
    if kind not in ROPE_SCALINGS:
        raise refuse(NAME, f"rope_type={kind} is not written by ptq's GGUF export",
                     f"rope_type {', '.join(ROPE_SCALINGS)}")
    return ROPE_SCALINGS[kind](parameters, arch)


def transformer_fields(config: Any, arch: str, vocab_size: int) -> list[Field]:
    """The hyper-parameters llama.cpp reads for every decoder-only transformer, from the HF config."""
    heads = config.num_attention_heads
    parameters = rope(config)
    return [
        uint32(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), config.max_position_embeddings),
        uint32(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), config.hidden_size),
        uint32(Keys.LLM.BLOCK_COUNT.format(arch=arch), config.num_hidden_layers),
        uint32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), config.intermediate_size),
        uint32(Keys.LLM.VOCAB_SIZE.format(arch=arch), vocab_size),
        uint32(Keys.Attention.HEAD_COUNT.format(arch=arch), heads),
        uint32(Keys.Attention.HEAD_COUNT_KV.format(arch=arch), getattr(config, "num_key_value_heads", None) or heads),
        uint32(Keys.Attention.KEY_LENGTH.format(arch=arch), head_dim(config)),
        uint32(Keys.Attention.VALUE_LENGTH.format(arch=arch), head_dim(config)),
        float32(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch), config.rms_norm_eps),
        uint32(Keys.Rope.DIMENSION_COUNT.format(arch=arch), head_dim(config)),
        float32(Keys.Rope.FREQ_BASE.format(arch=arch), parameters.get("rope_theta", 10000.0)),
        *rope_scaling_fields(parameters, arch),
    ]


def no_fields(config: Any, arch: str) -> list[Field]:
    return []


def gemma3_fields(config: Any, arch: str) -> list[Field]:
    """Gemma 3's sliding window, after checking that llama.cpp's fixed choices are this model's: every sixth layer
    attends globally, local layers rotate with base 10000 unscaled, scores are scaled by 1/√head_dim (by
    1/√(hidden/heads) for the 62-layer 27B), and no soft-capping."""
    layers = config.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    local = dict((getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {})
    scalar = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim(config)
    checks = {
        "layer_types (llama.cpp: every 6th layer global)": list(config.layer_types) == pattern,
        "sliding rope (llama.cpp: theta 10000, unscaled)": (local.get("rope_theta", 10000.0) == 10000.0
                                                          and local.get("rope_type", "default") == "default"),
        f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp: {scalar})":
            config.query_pre_attn_scalar == scalar,
        "logit soft-capping (llama.cpp: none)": config.final_logit_softcapping is None
                                                and config.attn_logit_softcapping is None,
    }
    broken = [what for what, holds in checks.items() if not holds]
    if broken:
        raise refuse(NAME, f"this Gemma 3 differs from llama.cpp's fixed gemma3 graph in {', '.join(broken)}",
                     "Gemma 3 text models as released")
    return [uint32(Keys.Attention.SLIDING_WINDOW.format(arch=arch), config.sliding_window)]


def qwen_fields(config: Any, arch: str) -> list[Field]:
    if getattr(config, "use_sliding_window", False):
        raise refuse(NAME, "use_sliding_window=true: llama.cpp's qwen2/qwen3 graphs attend over the whole context",
                     "use_sliding_window=false")
    return []


@dataclass(frozen=True)
class Family:
    """How one HF model type becomes a llama.cpp architecture.

    ``rope_rows``: the tensors (by GGUF name, e.g. ``attn_q``) whose rows are reordered per head for llama.cpp's
    adjacent-pair rotation, with the config attribute holding their head count; ``norm_shift``: added to every
    ``*norm.weight``; ``fields``: the family's own hyper-parameters (and its refusals) besides the common ones.
    """

    arch: MODEL_ARCH
    rope_rows: dict[str, str] = field(default_factory=dict)
    norm_shift: float = 0.0
    fields: Callable[[Any, str], list[Field]] = no_fields

    @property
    def arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


LLAMA = Family(MODEL_ARCH.LLAMA, rope_rows={"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"})
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": Family(MODEL_ARCH.QWEN2, fields=qwen_fields),
    "qwen3": Family(MODEL_ARCH.QWEN3, fields=qwen_fields),
    "gemma3_text": Family(MODEL_ARCH.GEMMA3, norm_shift=1.0, fields=gemma3_fields),
}
"""HF ``config.model_type`` → llama.cpp architecture."""


NOT_CARRIED = {Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION,
               Keys.General.ALIGNMENT, Keys.General.DESCRIPTION}
"""Fields that describe the file (and the run that wrote it), not the model: always the new file's own."""
CARRIED_PREFIXES = ("general.", "tokenizer.")


def reader_field(source: ReaderField) -> Field:
    """A field of a GGUF file as the writer takes it (scalars, strings and flat arrays)."""
    if len(source.types) > 2:
        raise refuse(NAME, f"the source GGUF field {source.name} is a nested array", "flat metadata")
    value = source.contents()
    sub_type = source.types[1] if source.types[0] == GGUFValueType.ARRAY else None
    return Field(source.name, value, source.types[0], sub_type)


def same_value(a: Field, b: Field) -> bool:
    if a.type == GGUFValueType.FLOAT32:
        return np.float32(a.value) == np.float32(b.value)
    return a.value == b.value


def source_fields(path: Path, arch: str, derived: list[Field]) -> list[Field]:
    """The fields a source GGUF file passes on: ``general.*`` and ``tokenizer.*`` (not ``NOT_CARRIED``), and its
    other ``<arch>.*`` fields when every ``derived`` one it has agrees (it describes this model, e.g. the file the
    model was loaded from)."""
    fields = {key: reader_field(value) for key, value in GGUFReader(path).fields.items()}
    ours = {f.key: f for f in derived}
    source_arch = fields.get(Keys.General.ARCHITECTURE)
    own_arch = source_arch is not None and source_arch.value == arch and all(
        same_value(f, ours[key]) for key, f in fields.items() if key in ours)
    return [f for key, f in fields.items() if key not in NOT_CARRIED and key not in ours
            and (key.startswith(CARRIED_PREFIXES) or (own_arch and key.startswith(f"{arch}.")))]


# Tokenizers ----------------------------------------------------------------------------------------------------------

GPT2_REGEX = "gpt-2 regex"
BYTES = "bytes"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (GPT2_REGEX, BYTES): "gpt-2",
    ("digits", GPT2_REGEX, BYTES): "smollm",
    (f"split {QWEN2_SPLIT}", BYTES): "qwen2",
    (f"split {LLAMA3_SPLIT}", BYTES): "llama-bpe",
}
"""A tokenizer.json pre-tokenizer, as ``pre_tokenizer_steps`` describes it → llama.cpp's ``tokenizer.ggml.pre``."""
NORMALIZERS = (None, "NFC")
"""Normalizers written as no normalizer: Qwen2's NFC is accepted as llama.cpp's converter accepts it."""


def pre_tokenizer_steps(spec: dict[str, Any] | None) -> tuple[str, ...]:
    """The splitting steps of a tokenizer.json ``pre_tokenizer`` (a Sequence is flattened), named so that
    ``PRE_TOKENIZERS`` can recognise them; a step it does not describe is named by its JSON."""
    if spec is None:
        return ()
    if spec["type"] == "Sequence":
        return tuple(step for child in spec["pretokenizers"] for step in pre_tokenizer_steps(child))
    if spec["type"] == "ByteLevel" and not spec.get("add_prefix_space"):
        return (GPT2_REGEX, BYTES) if spec.get("use_regex", True) else (BYTES,)
    if spec["type"] == "Digits" and spec.get("individual_digits"):
        return ("digits",)
    if spec["type"] == "Split" and "Regex" in spec.get("pattern", {}) and spec.get("behavior") == "Isolated" \
            and not spec.get("invert"):
        return (f"split {spec['pattern']['Regex']}",)
    return (json.dumps(spec, sort_keys=True),)


def token_type(added: dict[str, Any] | None) -> TokenType:
    if added is None:
        return TokenType.NORMAL
    return TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED


def special_ids(tokenizer: Any) -> list[Field]:
    """bos / eos / unk / pad ids, and whether encoding adds bos or eos (observed on a one-letter text)."""
    keys = {Keys.Tokenizer.BOS_ID: "bos_token_id", Keys.Tokenizer.EOS_ID: "eos_token_id",
            Keys.Tokenizer.UNK_ID: "unk_token_id", Keys.Tokenizer.PAD_ID: "pad_token_id"}
    fields = [uint32(key, getattr(tokenizer, attribute)) for key, attribute in keys.items()
              if getattr(tokenizer, attribute, None) is not None]
    plain, framed = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    start = len(framed) > len(plain) and framed[0] == tokenizer.bos_token_id
    end = len(framed) > len(plain) and framed[-1] == tokenizer.eos_token_id
    return [*fields, flag(Keys.Tokenizer.ADD_BOS, start), flag(Keys.Tokenizer.ADD_EOS, end)]


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> list[Field]:
    """llama.cpp's ``gpt2`` (byte-level BPE) tokenizer fields from a HF fast tokenizer; ids the tokenizer leaves
    unused below ``vocab_size`` become ``[PAD<id>]`` tokens of type UNUSED, as llama.cpp's converter writes them."""
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise refuse(NAME, "no fast (tokenizer.json) tokenizer to write and no source GGUF to carry one from",
                     "models with a HF fast tokenizer, or loaded from a GGUF file")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, normalizer = spec["model"], (spec.get("normalizer") or {}).get("type")
    steps = pre_tokenizer_steps(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if model["type"] != "BPE" or model.get("byte_fallback") or pre is None or normalizer not in NORMALIZERS:
        raise refuse(NAME, f"the {model['type']} tokenizer (pre-tokenizer steps {list(steps)}, normalizer "
                           f"{normalizer}) is not one that llama.cpp's byte-level BPE reproduces",
                     f"byte-level BPE tokenizers with pre-tokenizers {', '.join(PRE_TOKENIZERS.values())}, or a "
                     "model loaded from a GGUF file")
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    names = {**{index: token for token, index in model["vocab"].items()},
             **{index: token["content"] for index, token in added.items()}}
    if max(names) >= vocab_size:
        raise refuse(NAME, f"the tokenizer has ids up to {max(names)}, the embedding {vocab_size} rows",
                     "a tokenizer whose ids index the model's embedding")
    tokens = [names.get(index, f"[PAD{index}]") for index in range(vocab_size)]
    types = [TokenType.UNUSED if index not in names else token_type(added.get(index)) for index in range(vocab_size)]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    template = getattr(tokenizer, "chat_template", None)
    return [
        string(Keys.Tokenizer.MODEL, "gpt2"),
        string(Keys.Tokenizer.PRE, pre),
        array(Keys.Tokenizer.LIST, tokens, GGUFValueType.STRING),
        array(Keys.Tokenizer.TOKEN_TYPE, [int(t) for t in types], GGUFValueType.INT32),
        array(Keys.Tokenizer.MERGES, merges, GGUFValueType.STRING),
        *special_ids(tokenizer),
        *([string(Keys.Tokenizer.CHAT_TEMPLATE, template)] if isinstance(template, str) else []),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One tensor as the writer takes it: its ggml type, and an array of that type (``raw``: the type's bytes)."""

    name: str
    data: np.ndarray
    qtype: GGMLQuantizationType
    raw: bool


FLOAT_TYPES: dict[torch.dtype, GGMLQuantizationType] = {
    torch.float32: GGMLQuantizationType.F32,
    torch.float16: GGMLQuantizationType.F16,
    torch.bfloat16: GGMLQuantizationType.BF16,
}
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    **{qtype: fmt.file_type for qtype, fmt in BLOCK_FORMATS.items()},
}


def float_tensor(name: str, value: torch.Tensor) -> Tensor:
    """A floating-point tensor: 1-D ones (norms, biases) in F32 as llama.cpp expects them, others in their dtype
    (bfloat16 as raw BF16 bytes, which numpy has no type for)."""
    value = value.detach().cpu()
    if value.dim() < 2:
        return Tensor(name, value.float().numpy(), GGMLQuantizationType.F32, raw=False)
    qtype = FLOAT_TYPES[value.dtype]
    if qtype == GGMLQuantizationType.BF16:
        return Tensor(name, value.contiguous().view(torch.int16).numpy().view(np.uint8), qtype, raw=True)
    return Tensor(name, value.contiguous().numpy(), qtype, raw=False)


def rope_row_order(rows: int, heads: int) -> np.ndarray:
    """The row order of llama.cpp's ``llama`` q/k weights: in each head, rows (i, i + d/2) of transformers' rotated
    halves become the adjacent rows (2i, 2i + 1). Row r of the file is row ``order[r]`` of the HF weight."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def quantized_tensor(name: str, linear: FakeQuantLinear, order: np.ndarray | None) -> Tensor:
    """The ggml blocks of a calibrated Linear, rows reordered by ``order`` (integers, scales and zero points alike)."""
    fmt = block_format(linear.weight_spec)
    q, scale, zero = block_grid(linear)
    if order is not None:
        q, scale, zero = q[order], scale[order], zero[order]
    return Tensor(name, fmt.pack(q, scale, zero), fmt.qtype, raw=True)


@dataclass
class TensorNamer:
    """GGUF names of a model's parameters (gguf-py's ``TensorNameMap``) and the family's row orders."""

    family: Family
    config: Any

    def __post_init__(self) -> None:
        self.names = get_tensor_name_map(self.family.arch, self.config.num_hidden_layers)

    def name(self, parameter: str) -> str:
        module, _, leaf = parameter.rpartition(".")
        base = self.names.get_name(module)
        if base is None:
            raise refuse(NAME, f"{parameter} has no llama.cpp tensor in the {self.family.arch_name} architecture",
                         "the parameters of the family's HF model")
        return f"{base}.{leaf}"

    def row_order(self, gguf_name: str, rows: int) -> np.ndarray | None:
        kind = gguf_name.split(".")[-2]
        attribute = self.family.rope_rows.get(kind)
        if attribute is None:
            return None
        return rope_row_order(rows, getattr(self.config, attribute, None) or self.config.num_attention_heads)


def model_tensors(model: nn.Module, family: Family, embeddings: str = "model") -> Iterator[Tensor]:
    """Every parameter of ``model`` once (tied ones once), named for llama.cpp: calibrated Linears' weights as ggml
    blocks, the rest in floating point (the token embedding in Q8_0 if ``embeddings`` says so), with the family's
    row orders and norm shift."""
    namer = TensorNamer(family, model.config)
    linears = calibrated_linears(model)
    embedding = model.get_input_embeddings().weight
    for parameter, value in model.named_parameters():
        module, _, leaf = parameter.rpartition(".")
        name = namer.name(parameter)
        order = namer.row_order(name, value.shape[0])
        if module in linears and leaf == "weight":
            yield quantized_tensor(name, linears[module], order)
            continue
        if value is embedding and embeddings == "q8_0":
            yield Tensor(name, rounded_q8_0(value), GGMLQuantizationType.Q8_0, raw=True)
            continue
        value = value.detach()
        if order is not None:
            value = value[torch.from_numpy(order)]
        if family.norm_shift and parameter.endswith("norm.weight"):
            value = value.float() + family.norm_shift
        yield float_tensor(name, value)


def file_type(tensors: list[Tensor]) -> LlamaFileType:
    """llama.cpp's ``general.file_type``: the type of most matrices (as llama.cpp guesses it from a file)."""
    counts = Counter(tensor.qtype for tensor in tensors if tensor.data.ndim > 1)
    return FILE_TYPES[counts.most_common(1)[0][0] if counts else GGMLQuantizationType.F32]


# ---------------------------------------------------------------------------------------------------------------------
# The exporter
# ---------------------------------------------------------------------------------------------------------------------


def model_name(model: nn.Module, context: ExportContext) -> str:
    """``general.name``: the last part of the model's HF id or directory, else the run's description."""
    return Path(str(getattr(model.config, "name_or_path", "") or "")).name or context.description


def rounded_q8_0(value: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of a floating-point matrix, rounded as llama.cpp rounds it (d = max|x| / 127 per 32 weights, in
    fp16; q = round(x / d)): the embedding table under ``export.embeddings=q8_0``, the one tensor such an export
    rounds that the run did not."""
    x = value.detach().float().reshape(value.shape[0], -1, BLOCK)
    d = (x.abs().amax(dim=-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, torch.round(x / d.clamp_min(torch.finfo(torch.float16).tiny)), 0.0).clamp(-127, 127)
    return pack_q8_0(q.numpy(), d.squeeze(-1).numpy(), np.zeros(0))


EMBEDDINGS = ("model", "q8_0")
"""``export.embeddings``: the token embedding (and a tied output head) in the model's dtype (exact), or in Q8_0
(llama.cpp's usual choice for a 4-bit file: 8.5 bits per weight instead of 16 or 32)."""


class GGUFExporter:
    """Writes calibrated Llama, Mistral, Qwen2, Qwen3 and Gemma 3 text models as one GGUF file for llama.cpp."""

    name = NAME
    options: dict[str, tuple[str, ...]] = {"embeddings": EMBEDDINGS}
    stores_online_modules = False  # llama.cpp runs its own graph
    sharded = False

    def check(self, plan: ExportPlan) -> None:
        if plan.model_type not in FAMILIES:
            raise refuse(self.name, f"model_type={plan.model_type!r} is not a family ptq writes for llama.cpp",
                         f"model types {', '.join(FAMILIES)}")
        if plan.model_dtype not in FLOAT_TYPES:
            raise refuse(self.name, f"model.dtype={plan.model_dtype} has no GGUF tensor type",
                         "model.dtype float32, float16 or bfloat16")
        ragged = sorted(width for width in plan.in_features if width % BLOCK)
        if ragged:
            raise refuse(self.name, f"in_features {', '.join(map(str, ragged))} not a multiple of {BLOCK} (a ggml "
                                    f"block holds {BLOCK} weights of one row)",
                         f"models whose quantized Linears have in_features % {BLOCK} == 0")
        for scheme in plan.schemes:
            refusal = scheme_refusal(scheme)
            if refusal is not None:
                raise refuse(self.name, f"{scheme.describe()}: {refusal[0]}", refusal[1])

    def write(self, model: nn.Module, directory: Path, context: ExportContext) -> Path:
        config = model.config
        linears = calibrated_linears(model)
        embedding = model.get_input_embeddings().weight
        self.check(ExportPlan(tuple(dict.fromkeys(map(linear_scheme, linears.values()))),
                              frozenset(linear.in_features for linear in linears.values()), embedding.dtype,
                              getattr(config, "model_type", "")))
        family = FAMILIES[config.model_type]
        arch, vocab_size = family.arch_name, embedding.shape[0]
        derived = [*transformer_fields(config, arch, vocab_size), *family.fields(config, arch)]
        if context.source_gguf is not None:
            carried = source_fields(Path(context.source_gguf), arch, derived)
        else:
            carried = [string(Keys.General.TYPE, "model"), string(Keys.General.NAME, model_name(model, context)),
                       *tokenizer_fields(context.tokenizer, vocab_size)]
        tokens = next((f.value for f in carried if f.key == Keys.Tokenizer.LIST), [])
        if len(tokens) != vocab_size:
            raise refuse(self.name, f"the tokenizer has {len(tokens)} tokens, the embedding {vocab_size} rows "
                                    "(llama.cpp requires them equal)", "a tokenizer of the model's vocabulary")
        tensors = list(model_tensors(model, family, context.options.get("embeddings", "model")))
        path = Path(directory) / FILE_NAME
        writer = GGUFWriter(path, arch)
        for item in (*derived, *carried, string(Keys.General.DESCRIPTION, context.description),
                     uint32(Keys.General.FILE_TYPE, file_type(tensors)),
                     uint32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)):
            writer.add_key_value(item.key, item.value, item.type, item.sub_type)
        for tensor in tensors:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.qtype if tensor.raw else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        error = q4_1_offset_error(model)
        context.extra["q4_1_offset_error_steps"] = error
        logger.info("wrote %s (%s); Q4_1 offset error %.2e steps", path, file_type(tensors).name, error)
        return path
