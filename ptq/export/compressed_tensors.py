"""The compressed-tensors checkpoint: a HF model directory that transformers' ``from_pretrained`` and vLLM load.

The format (https://github.com/vllm-project/compressed-tensors, read against version 0.20) is the model's own
directory plus a ``quantization_config`` in ``config.json``: config groups, each a ``QuantizationScheme`` (the
``QuantizationArgs`` of the weights and of the input activations, and the modules it targets), the ``ignore`` list
and the storage format of the tensors:

- ``pack-quantized`` for weight-only integer schemes (W2..W8 A16): ``<linear>.weight_packed`` (int32, 32 values
  of b bits in b words), ``weight_scale`` [out, groups], ``weight_zero_point`` (asymmetric: packed the same way
  along the output dimension) and ``weight_shape``;
- ``int-quantized`` when the activations are quantized too (W8A8): ``<linear>.weight`` int8, ``weight_scale``,
  ``weight_zero_point`` (asymmetric), per-token dynamic activations in the config only, or static per-tensor
  ``input_scale`` / ``input_zero_point``;
- ``float-quantized`` (FP8 E4M3 weights with quantized activations) and ``naive-quantized`` (FP8 weight-only):
  ``<linear>.weight`` float8_e4m3fn, ``weight_scale`` per tensor, channel or group in the model's dtype, and the
  activations as for ``int-quantized``;
- ``mxfp8-quantized`` / ``mxfp4-pack-quantized``: E4M3 elements (``weight``) or E2M1 ones (``weight_packed``, two
  per uint8, low nibble first), ``weight_scale`` [out, in / 32] uint8 E8M0 exponents (2^(e − 127));
- ``nvfp4-pack-quantized``: E2M1 ``weight_packed``, ``weight_scale`` [out, in / 16] float8_e4m3fn and the float32
  ``weight_global_scale`` G, under which a block's scale is s / G (G ≈ 1 / g, ptq's NVFP4 tensor scale).

The exporter writes no tensor layout itself. ``apply_quantization_config`` attaches the schemes to ``nn.Linear``
stand-ins of the calibrated ``FakeQuantLinear``s, their ``weight_scale`` / ``weight_zero_point`` / ``input_*``
parameters receive what calibration decided, ``compress_module`` rounds and packs each weight, and
``ModelCompressor`` (``from_pretrained_model``, ``update_config``) writes the config. Each stand-in holds
W = s · (q − z) in float32 (one layer at a time), from which compressed-tensors' W / s + z rounds back to ptq's
integers, or float elements, exactly.

Grids. compressed-tensors keeps every integer in the signed range [−2^(b−1), 2^(b−1) − 1]; ptq's asymmetric
integers q ∈ [0, 2^b − 1] and zero points z are therefore stored shifted by 2^(b−1), which leaves s · (q − z)
unchanged. Its dynamic per-token scale, max|x| / 127.5 for int8 and max|x| / 448 for FP8 (``calculate_qparams``:
max / (range / 2)), its asymmetric zero point and its FP8 rounding (a clamp to ±448, then torch's cast to
float8_e4m3fn: ties to even) are ptq's (``ptq.affine.minmax_qparams``, ``ptq.formats.E4M3``). Integer and FP8 scales
are stored in the model's dtype: transformers creates the scale parameters in it and casts what it loads, vLLM's
weight-only kernels take half scales, and compressed-tensors dequantizes in the scale's dtype — s · (q − z) rounded
once, as ptq rounds it. A float32 model holds scales of every ``scale_dtype``; a half model only scales of its own
dtype, and no quantized activations: compressed-tensors fake-quantizes them in the model's dtype, where x / s is
rounded before it is rounded to the grid (ptq divides in float32).

Float grids beyond FP8. MX scales are powers of two and E2M1 / E4M3 elements have at most 4 significant bits, so
compressed-tensors' bfloat16 dequantization of MXFP4 and MXFP8 (``decompress_mx_scale``) is exact, and the weights
reload as ptq's in every model dtype. NVFP4 reloads as bfloat16(q · (s / G)), the division in float32: exact for
bfloat16 models only (a float32 model's weights q · s · g have more bits than bfloat16 keeps), and only under the
float32 G that ``nvfp4_scales`` chooses, since s / (1 / g) and s · g can differ in float32's last bit. MX and NVFP4
export weight-only: compressed-tensors leaves their decompressed weights in bfloat16 when it keeps its own forward
(which a checkpoint with quantized activations needs), rounds a dynamic MX block's maximum up to the next power of
two when its mantissa is 1.75 or more (``generate_mx_scales``), where OCP MX, and ptq, take ⌊log2 max|x|⌋, and
quantizes NVFP4 activations under a static, calibrated global scale, where ptq takes each input's own tensor
scale. E5M2 has no compressed-tensors type.

Loading: ``from_pretrained_kwargs`` names the ``from_pretrained`` arguments each kind of checkpoint needs.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ptq.affine import dequantize
from ptq.export.base import ExportContext, ExportPlan, calibrated_linears, linear_scheme, refuse
from ptq.formats import E4M3, E4M3_SMALLEST
from ptq.nn import ActivationQuantizer, FakeQuantLinear, set_submodule
from ptq.spec import LinearScheme, QuantSpec

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

NAME = "compressed_tensors"
CONFIG = "config.json"
QUANT_METHOD = "compressed-tensors"
HALF_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
SCALE_CODES = {"e8m0": torch.uint8, "e4m3": torch.float8_e4m3fn}
"""How compressed-tensors stores the scales of ``GridFormat.scale`` kinds that are codes, not floats of the model's
dtype: MX's E8M0 exponents and NVFP4's E4M3 block scales."""
FLAT_INPUT_MODELS = frozenset({"opt"})
"""Model types whose Linears see 2-D inputs (OPT's MLP reshapes to [tokens, features]): compressed-tensors reduces
dynamic per-token ranges over the dims after the first two, so these get one scale per tensor on reload. Found by
reading the modeling files of every family ``ptq.models.MAPPINGS`` knows."""


def model_refusal(model_type: str) -> tuple[str, str] | None:
    """(reason, allowed) when ``model_type`` is not a transformers causal LM built of ``nn.Linear``s.

    GPT-2-style models build theirs as ``Conv1D`` ([in, out] weights), which compressed-tensors does not quantize
    (``apply_quantization_config`` takes ``nn.Linear`` and ``nn.Embedding``): the reloaded model would reject the
    packed tensors.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.pytorch_utils import Conv1D

    allowed = "transformers causal LMs built of nn.Linear (llama, mistral, qwen2, gemma, opt, phi3, falcon, ...)"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"model_type={model_type!r} is not a transformers causal LM, as this format's checkpoints are", allowed
    modeling = inspect.getmodule(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))
    if any(value is Conv1D for value in vars(modeling).values()):
        return (f"model_type={model_type!r} builds its Linears as Conv1D, which compressed-tensors does not "
                "quantize (nn.Linear only)", allowed)
    return None


def dtype_refusal(spec: QuantSpec, model_dtype: torch.dtype) -> tuple[str, str] | None:
    """(reason, allowed) when the weight scales of ``spec`` are not exactly representable in the model's dtype
    (integer and FP8 scales, which are stored in it; MX and NVFP4 scales are stored in their own codes)."""
    if spec.grid.scale != "float" or model_dtype == torch.float32 or HALF_DTYPES.get(model_dtype) == spec.scale_dtype:
        return None
    if model_dtype not in HALF_DTYPES:
        return f"model.dtype={model_dtype} cannot hold the scales", "model.dtype float32, bfloat16 or float16"
    half = HALF_DTYPES[model_dtype]
    return (f"scale_dtype={spec.scale_dtype} is not exact in the {half} scales a {half} model stores",
            f"scale_dtype={half} with model.dtype={half}, or model.dtype=float32")


def format_refusal(scheme: LinearScheme, model_dtype: torch.dtype) -> tuple[str, str] | None:
    """(reason, allowed) when compressed-tensors has no grid, or reloads other values, for the format of the weights
    or of the activations (see the module docstring)."""
    weight, activations = scheme.weight, scheme.activations
    if "fp8_e5m2" in (weight.format, activations and activations.format):
        return ("compressed-tensors 0.20 has no E5M2 type (its 8-bit floats are E4M3)",
                "format=fp8_e4m3 or int (and mxfp8, mxfp4, nvfp4 for weights)")
    weight_only = f"{weight.format} weights with activations=null, or int / fp8_e4m3 activations"
    if activations is not None and activations.grid.scale == "e8m0":
        return ("compressed-tensors rounds a dynamic MX block's max up to the next power of two from mantissa 1.75 on "
                "(generate_mx_scales), where OCP MX's scale, and ptq's, is 2^(⌊log2 max|x|⌋ − emax)", weight_only)
    if activations is not None and activations.grid.tensor_scale:
        return ("compressed-tensors quantizes NVFP4 activations under a static, calibrated global scale "
                "(input_global_scale), where ptq takes each input's own tensor scale", weight_only)
    if activations is not None and weight.grid.scale in SCALE_CODES:
        return ("compressed-tensors 0.20 decompresses MX and NVFP4 weights into bfloat16 parameters, which a float32 "
                "model's activation-quantizing forward cannot multiply (and a half model quantizes activations in its "
                "dtype)", f"{weight.format} weights with activations=null, or int / fp8_e4m3 weights with activations")
    if weight.format == "nvfp4" and model_dtype != torch.bfloat16:
        return (f"compressed-tensors 0.20 dequantizes NVFP4 weights in bfloat16 (unpack_fp4_from_uint8's default), so "
                f"a {str(model_dtype).removeprefix('torch.')} model would reload them rounded",
                "model.dtype=bfloat16 for nvfp4, or mxfp4, mxfp8, fp8_e4m3 weights in any dtype")
    return None


def activation_refusal(scheme: LinearScheme, plan: ExportPlan) -> tuple[str, str] | None:
    """(reason, allowed) when transformers' compressed-tensors forward would not quantize the inputs as ptq does."""
    if scheme.act_clip_ratio != 1:
        return (f"compressed-tensors has no clip ratio for dynamic activations (activations.clip_ratio="
                f"{scheme.act_clip_ratio:g})", "activations.clip_ratio=1")
    if not scheme.static_activations and plan.model_type in FLAT_INPUT_MODELS:
        return (f"{plan.model_type} flattens some Linears' inputs to [tokens, features], of which compressed-tensors' "
                "per-token quantization takes one scale for the whole tensor", f"static activations "
                f"(activations.observer) or weight-only schemes for {plan.model_type}")
    if plan.model_dtype != torch.float32:
        half = HALF_DTYPES.get(plan.model_dtype, str(plan.model_dtype))
        return (f"compressed-tensors fake-quantizes a {half} model's inputs in {half} (x / s is rounded to {half} "
                "before the rounding to the grid, which ptq does in float32), so reloaded logits would differ",
                f"model.dtype=float32 for quantized activations, or weight-only schemes in {half}")
    return None


def scheme_refusal(scheme: LinearScheme, plan: ExportPlan) -> tuple[str, str] | None:
    """(reason, allowed) when compressed-tensors cannot hold ``scheme`` exactly in ``plan``'s model, else None."""
    weight = scheme.weight
    if scheme.outliers:
        return ("LLM.int8() multiplies outlier columns it finds at run time in full precision, which no "
                "compressed-tensors scheme describes", "rtn, gptq, awq, smoothquant and mixed methods")
    refusal = format_refusal(scheme, plan.model_dtype)
    if refusal is not None:
        return refusal
    if scheme.act_order:
        return ("act-order without static groups needs a per-column group index (g_idx), which compressed-tensors "
                "0.20 no longer stores (actorder='group' was removed)", "act_order=false, or act_order with "
                "static_groups=true")
    ragged = sorted(width for width in plan.in_features if weight.granularity == "group" and width % weight.group_size)
    if ragged:
        return (f"in_features {', '.join(map(str, ragged))} not a multiple of group_size={weight.group_size} "
                "(compressed-tensors needs columns % group_size == 0)",
                f"a group_size dividing every in_features ({', '.join(map(str, sorted(plan.in_features)))}), "
                "or granularity=channel" if weight.grid.group_size is None else
                f"format={weight.format} where every in_features is a multiple of {weight.group_size}, or int / "
                "fp8_e4m3 with granularity=channel")
    refusal = activation_refusal(scheme, plan) if scheme.activations is not None else None
    return refusal or dtype_refusal(weight, plan.model_dtype)


def plan_refusal(schemes: tuple[LinearScheme, ...]) -> tuple[LinearScheme, str, str] | None:
    """(scheme, reason, allowed) when the schemes together cannot be reloaded exactly: several asymmetric
    weight-only widths (mixed precision), which transformers can load neither packed nor dequantized."""
    asymmetric = [s for s in schemes if s.activations is None and not s.weight.symmetric]
    if len({s.weight.bits for s in asymmetric}) < 2:
        return None
    return (asymmetric[0], f"{len(asymmetric)} asymmetric weight-only widths: transformers 5 dequantizes every "
            "layer with the first config group's scheme and cannot load packed zero points compressed",
            "symmetric=true for mixed precision, or one asymmetric width")


def quantization_args(spec: QuantSpec, dynamic: bool = False) -> QuantizationArgs:
    """compressed-tensors' description of a ptq grid: int (signed range) or float (E4M3 / E2M1 elements), with
    NVFP4's two-level scales as the ``tensor_group`` strategy and the MX and NVFP4 scale codes as ``scale_dtype``
    (uint8 E8M0 exponents, float8_e4m3fn), as compressed-tensors' MXFP4 / MXFP8 / NVFP4 presets write them."""
    from compressed_tensors.quantization import QuantizationArgs

    grid = spec.grid
    return QuantizationArgs(num_bits=spec.bits, type="float" if grid.is_float else "int", symmetric=spec.symmetric,
                            strategy="tensor_group" if grid.tensor_scale else spec.granularity,
                            group_size=spec.group_size if spec.granularity == "group" else None, dynamic=dynamic,
                            scale_dtype=SCALE_CODES.get(grid.scale))


def input_args(quantizer: ActivationQuantizer | None) -> QuantizationArgs | None:
    """compressed-tensors' description of an input quantizer: dynamic per token, or static per tensor."""
    return None if quantizer is None else quantization_args(quantizer.spec, dynamic=quantizer.dynamic)


def config_groups(linears: dict[str, FakeQuantLinear]) -> dict[str, QuantizationScheme]:
    """One config group per distinct (weight, input) scheme, in module order.

    A single group targets the class ``Linear`` (the ignore list excludes the rest), as llm-compressor writes it;
    mixed precision targets each group's modules by name.
    """
    from compressed_tensors.quantization import QuantizationScheme

    groups: list[tuple[QuantizationArgs, QuantizationArgs | None, list[str]]] = []
    for name, linear in linears.items():
        weights, inputs = quantization_args(linear.weight_spec), input_args(linear.input_quantizer)
        match = next((group for group in groups if group[:2] == (weights, inputs)), None)
        if match is None:
            groups.append((weights, inputs, [name]))
        else:
            match[2].append(name)
    return {f"group_{i}": QuantizationScheme(targets=["Linear"] if len(groups) == 1 else names, weights=weights,
                                             input_activations=inputs)
            for i, (weights, inputs, names) in enumerate(groups)}


def signed(zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A zero point in compressed-tensors' signed range (int8): z − 2^(b−1) if asymmetric, 0 if symmetric."""
    return (zero.float() - (0 if spec.symmetric else 2 ** (spec.bits - 1))).to(torch.int8)


def set_param(module: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Replace parameter ``name`` of ``module`` (on the meta device) by ``value`` in its shape and in ``dtype``
    (default: the parameter's)."""
    param = getattr(module, name)
    if param.numel() != value.numel():
        raise ValueError(f"compressed-tensors expects {name} {tuple(param.shape)}, ptq holds {tuple(value.shape)}")
    setattr(module, name, nn.Parameter(value.reshape(param.shape).to(dtype or param.dtype), requires_grad=False))


def float32_neighbours(x: torch.Tensor, reach: int) -> Iterator[torch.Tensor]:
    """The positive float32 ``x`` (one element), then the float32 values up to ``reach`` steps either side of it,
    nearest first."""
    bits = x.float().reshape(1).view(torch.int32)
    for step in sorted(range(-reach, reach + 1), key=abs):
        yield (bits + step).view(torch.float32)


def nvfp4_factors(block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The E4M3 block scales s and the tensor scale g of which ptq's effective NVFP4 block scales are s · g.

    ``FakeQuantLinear.weight_scale`` keeps only s · g (``ptq.formats.nvfp4_block_scale``). g is found back from the
    largest block scale, whose s is 448 after RTN (max|W|'s block fills E4M3's range) and another E4M3 value after
    GPTQ's updates: the first float32 g next to max(s · g) / s under which every block scale is E4M3(· / g) · g
    (None if there is none: not an NVFP4 tensor).
    """
    largest = block_scale.amax()
    for top in E4M3.values.flip(0)[:-1]:  # 448 down to the smallest subnormal
        for g in float32_neighbours(largest / top, 2):
            stored = E4M3.round(block_scale / g).clamp_min(E4M3_SMALLEST)
            if torch.equal(stored * g, block_scale):
                return stored, g
    return None


def nvfp4_scales(name: str, linear: FakeQuantLinear, scheme: QuantizationScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """The E4M3 block scales and the float32 ``weight_global_scale`` G under which compressed-tensors reloads an NVFP4
    Linear's weight as FakeQuantLinear.weight.

    compressed-tensors dequantizes block scale s as s / G in float32. G = 1 / g rounded to float32 gives back
    s · g up to float32's last bit, which the bfloat16 weights absorb in nearly every tensor; where it does not, a
    float32 neighbour of 1 / g does. Each G is judged by compressed-tensors' own decompression of the packed codes;
    a Linear that none reloads exactly is refused.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.config import CompressionFormat

    factors = nvfp4_factors(linear.weight_scale)
    if factors is None:
        raise refuse(NAME, f"{name}: its block scales are not E4M3 values under one float32 tensor scale",
                     "NVFP4 Linears as ptq calibrates them")
    stored, g = factors
    compressor = BaseCompressor.get_value_from_registry(CompressionFormat.nvfp4_pack_quantized.value)
    state = {"weight_packed": pack_fp4_to_uint8(linear.weight_int.float()),
             "weight_scale": stored.to(SCALE_CODES["e4m3"])}
    for global_scale in float32_neighbours(1 / g, 4):
        reloaded = compressor.decompress({**state, "weight_global_scale": global_scale}, scheme)["weight"]
        if torch.equal(reloaded.to(linear.weight.dtype), linear.weight):
            return stored, global_scale
    raise refuse(NAME, f"{name}: no float32 global scale near 1 / g makes compressed-tensors reload its NVFP4 weight "
                 "bit for bit", "export=ptq for this model, or format=mxfp4")


def fill(name: str, stand_in: nn.Linear, linear: FakeQuantLinear) -> None:
    """Give a stand-in the weight and the qparams ``apply_quantization_config`` created for it (zero points too:
    compressed-tensors creates them for symmetric schemes as well, and drops them when it compresses).

    The weight is s · (q − z) in float32, so that compressed-tensors' rounding of W / s + z recovers q exactly in
    any model dtype; integer and FP8 scales keep the model's dtype (the parameters were created in it), MX and NVFP4
    scales, which compressed-tensors turns into their codes, are handed over in float32 (a float16 parameter would
    lose E8M0's extreme exponents).
    """
    spec = linear.weight_spec
    weight = dequantize(linear.weight_int, linear.weight_scale, linear.weight_zero, spec)
    stand_in.weight = nn.Parameter(weight, requires_grad=False)
    coded = torch.float32 if spec.grid.scale in SCALE_CODES else None
    if spec.grid.tensor_scale:
        stored, global_scale = nvfp4_scales(name, linear, stand_in.quantization_scheme)
        set_param(stand_in, "weight_scale", stored, coded)
        set_param(stand_in, "weight_global_scale", global_scale)
    else:
        set_param(stand_in, "weight_scale", linear.weight_scale, coded)
    set_param(stand_in, "weight_zero_point", signed(linear.weight_zero, spec))
    quantizer = linear.input_quantizer
    if quantizer is not None and not quantizer.dynamic:
        set_param(stand_in, "input_scale", quantizer.scale)
        set_param(stand_in, "input_zero_point", signed(quantizer.zero, quantizer.spec))


def stand_in_for(linear: FakeQuantLinear) -> nn.Linear:
    """A plain Linear of the same shape, dtype and bias (shared, not copied) for compressed-tensors to work on.

    Its weight lives on the meta device until ``fill`` gives it values, so that one layer at a time is held in
    float32 while the model is compressed.
    """
    stand_in = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta",
                         dtype=linear.weight.dtype)
    stand_in.bias = linear.bias
    return stand_in


@contextmanager
def stand_ins(model: nn.Module, linears: dict[str, FakeQuantLinear]) -> Iterator[dict[str, nn.Linear]]:
    """Swap every calibrated Linear for a plain stand-in for the duration, then put the originals back."""
    replacements = {name: stand_in_for(linear) for name, linear in linears.items()}
    try:
        for name, stand_in in replacements.items():
            set_submodule(model, name, stand_in)
        yield replacements
    finally:
        for name, linear in linears.items():
            set_submodule(model, name, linear)


@contextmanager
def config_kept(config: Any) -> Iterator[None]:
    """Undo what ``save_pretrained`` writes into the model's config (``architectures``, ``dtype``) on the way."""
    kept = dict(vars(config))
    try:
        yield
    finally:
        for key in set(vars(config)) - set(kept):
            delattr(config, key)
        vars(config).update(kept)


def patch_config(directory: Path, updates: dict[str, Any], quantization: dict[str, Any]) -> None:
    """Set top-level ``updates`` and ``quantization_config`` entries ``quantization`` in ``directory/config.json``."""
    path = directory / CONFIG
    config = json.loads(path.read_text())
    config.update(updates)
    config["quantization_config"].update(quantization)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def tied_head_quantized(model: nn.Module, linears: dict[str, FakeQuantLinear]) -> bool:
    """Whether the output embedding is a calibrated Linear of a model whose config ties it to the input one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return any(linear is head for linear in linears.values()) and bool(
        getattr(model.config, "tie_word_embeddings", False))


def needs_dequantize(groups: dict[str, QuantizationScheme]) -> bool:
    """Whether transformers must dequantize at load time: asymmetric weight-only integers (its compressed modules
    expect zero points unpacked, [out, groups], and reject the packed ones with a size mismatch) and MX / NVFP4
    weights (compressed-tensors decompresses them into bfloat16 parameters, which a float32 model's forward rejects;
    dequantizing casts them to the model's dtype, exactly)."""
    (group, *others) = groups.values()
    coded = group.weights.scale_dtype in SCALE_CODES.values()
    return not others and group.input_activations is None and (coded or not group.weights.symmetric)


class CompressedTensorsExporter:
    """Writes calibrated causal LMs as compressed-tensors checkpoints (pack-, int-, float-, naive-, mxfp8-quantized,
    mxfp4- or nvfp4-pack-quantized)."""

    name = NAME
    options: dict[str, tuple[str, ...]] = {}
    stores_online_modules = False  # transformers and vLLM would run the model without them
    sharded = False

    def check(self, plan: ExportPlan) -> None:
        refusal = model_refusal(plan.model_type)
        if refusal is not None:
            raise refuse(self.name, *refusal)
        for scheme in plan.schemes:
            refusal = scheme_refusal(scheme, plan)
            if refusal is not None:
                raise refuse(self.name, f"{scheme.describe()}: {refusal[0]}", refusal[1])
        mixed = plan_refusal(plan.schemes)
        if mixed is not None:
            raise refuse(self.name, f"{mixed[0].describe()}: {mixed[1]}", mixed[2])

    def write(self, model: nn.Module, directory: Path, context: ExportContext) -> Path:
        from compressed_tensors.compressors import ModelCompressor, compress_module
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

        directory = Path(directory)
        linears = calibrated_linears(model)
        if not linears:
            raise refuse(self.name, "the model has no calibrated Linear", "methods that quantize weights")
        dtype = next(iter(linears.values())).weight.dtype
        self.check(ExportPlan(tuple(dict.fromkeys(map(linear_scheme, linears.values()))),
                              frozenset(linear.in_features for linear in linears.values()), dtype,
                              getattr(model.config, "model_type", "")))
        groups = config_groups(linears)
        with stand_ins(model, linears) as replacements, config_kept(model.config):
            ignore = [name for name, module in model.named_modules()
                      if isinstance(module, nn.Linear) and name not in replacements]
            apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=ignore),
                                      show_progress=False)
            for name, stand_in in replacements.items():
                fill(name, stand_in, linears[name])
                compress_module(stand_in)
            compressor = ModelCompressor.from_pretrained_model(model)
            model.save_pretrained(directory)
        compressor.update_config(directory)
        patch_config(directory, {"tie_word_embeddings": False} if tied_head_quantized(model, linears) else {},
                     {"dequantize": True} if needs_dequantize(groups) else {})
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(directory)
        fmt = CompressionFormat(compressor.quantization_config.format).value
        (directory / "README.md").write_text(f"# {context.description}\n\ncompressed-tensors checkpoint ({fmt}) "
                                             "written by ptq; load it with transformers or vLLM.\n")
        return directory


def from_pretrained_kwargs(directory: Path) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load the checkpoint in ``directory`` as ptq computed it.

    A weight-only checkpoint of one config group (pack-, naive-, mxfp8-quantized, mxfp4- or nvfp4-pack-quantized)
    loads dequantized (``CompressedTensorsConfig(dequantize=True)``): a plain model whose weights equal the
    fake-quantized ones — the only way transformers 5 loads asymmetric integers, whose packed zero points its
    compressed modules reject, and MX weights into a float32 or float16 model (compressed-tensors would leave them in
    bfloat16). Everything else loads with the defaults: checkpoints that quantize activations (int- or
    float-quantized), whose compressed-tensors forward fake-quantizes each Linear's input (dequantizing would drop
    that), and mixed precision, which transformers' dequantizing load would read with the first group's scheme for
    every layer.
    Anything that is not a compressed-tensors checkpoint needs nothing.
    """
    path = Path(directory) / CONFIG
    config = (json.loads(path.read_text()).get("quantization_config") or {}) if path.is_file() else {}
    groups = list(config.get("config_groups", {}).values())
    if config.get("quant_method") != QUANT_METHOD or len(groups) != 1 or groups[0].get("input_activations"):
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
