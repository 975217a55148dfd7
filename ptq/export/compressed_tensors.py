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
  ``input_scale`` / ``input_zero_point``.

The exporter writes no tensor layout itself. ``apply_quantization_config`` attaches the schemes to ``nn.Linear``
stand-ins of the calibrated ``FakeQuantLinear``s, their ``weight_scale`` / ``weight_zero_point`` / ``input_*``
parameters receive what calibration decided, ``compress_module`` rounds and packs each weight, and
``ModelCompressor`` (``from_pretrained_model``, ``update_config``) writes the config. Each stand-in holds
W = s · (q − z) in float32 (one layer at a time), from which compressed-tensors' W / s + z rounds back to ptq's
integers exactly.

Grids. compressed-tensors keeps every integer in the signed range [−2^(b−1), 2^(b−1) − 1]; ptq's asymmetric
integers q ∈ [0, 2^b − 1] and zero points z are therefore stored shifted by 2^(b−1), which leaves s · (q − z)
unchanged. Its dynamic per-token scale, max|x| / 127.5 for int8 (``calculate_qparams``: max / (range / 2)), and its
asymmetric zero point are ptq's (``ptq.affine.minmax_qparams``). Scales are stored in the model's dtype:
transformers creates the scale parameters in it and casts what it loads, vLLM's weight-only kernels take half
scales, and compressed-tensors dequantizes in the scale's dtype — s · (q − z) rounded once, as ptq rounds it.
A float32 model holds scales of every ``scale_dtype``; a half model only scales of its own dtype, and no quantized
activations: compressed-tensors fake-quantizes them in the model's dtype, where x / s is rounded before it is
rounded to an integer (ptq divides in float32).

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
from ptq.export.base import ExportContext, ExportPlan, calibrated_linears, group_order_index, refuse
from ptq.nn import ActivationQuantizer, FakeQuantLinear, set_submodule
from ptq.spec import LinearScheme, QuantSpec

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

NAME = "compressed_tensors"
CONFIG = "config.json"
QUANT_METHOD = "compressed-tensors"
HALF_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
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
    """(reason, allowed) when the weight scales of ``spec`` are not exactly representable in the model's dtype."""
    if model_dtype == torch.float32 or HALF_DTYPES.get(model_dtype) == spec.scale_dtype:
        return None
    if model_dtype not in HALF_DTYPES:
        return f"model.dtype={model_dtype} cannot hold the scales", "model.dtype float32, bfloat16 or float16"
    half = HALF_DTYPES[model_dtype]
    return (f"scale_dtype={spec.scale_dtype} is not exact in the {half} scales a {half} model stores",
            f"scale_dtype={half} with model.dtype={half}, or model.dtype=float32")


def activation_refusal(scheme: LinearScheme, plan: ExportPlan) -> tuple[str, str] | None:
    """(reason, allowed) when transformers' compressed-tensors forward would not quantize the inputs as ptq does."""
    if not scheme.static_activations and plan.model_type in FLAT_INPUT_MODELS:
        return (f"{plan.model_type} flattens some Linears' inputs to [tokens, features], of which compressed-tensors' "
                "per-token quantization takes one scale for the whole tensor", f"static activations "
                f"(activations.observer) or weight-only schemes for {plan.model_type}")
    if plan.model_dtype != torch.float32:
        half = HALF_DTYPES.get(plan.model_dtype, str(plan.model_dtype))
        return (f"compressed-tensors fake-quantizes a {half} model's inputs in {half} (x / s is rounded to {half} "
                "before the rounding to integers, which ptq does in float32), so reloaded logits would differ",
                f"model.dtype=float32 for quantized activations, or weight-only schemes in {half}")
    return None


def scheme_refusal(scheme: LinearScheme, plan: ExportPlan) -> tuple[str, str] | None:
    """(reason, allowed) when compressed-tensors cannot hold ``scheme`` exactly in ``plan``'s model, else None."""
    weight = scheme.weight
    formats = {weight.format} | ({scheme.activations.format} if scheme.activations is not None else set())
    if formats != {"int"}:
        return (f"this exporter writes integer grids, not format={'/'.join(sorted(formats - {'int'}))}",
                "format=int, or export=ptq for float grids")
    if scheme.outliers:
        return ("LLM.int8() multiplies outlier columns it finds at run time in full precision, which no "
                "compressed-tensors scheme describes", "rtn, gptq, awq, smoothquant and mixed methods")
    if scheme.act_order:
        return ("act-order without static groups needs a per-column group index (g_idx), which compressed-tensors "
                "0.20 no longer stores (actorder='group' was removed)", "act_order=false, or act_order with "
                "static_groups=true")
    ragged = sorted(width for width in plan.in_features if weight.granularity == "group" and width % weight.group_size)
    if ragged:
        return (f"in_features {', '.join(map(str, ragged))} not a multiple of group_size={weight.group_size} "
                "(compressed-tensors needs columns % group_size == 0)",
                f"a group_size dividing every in_features ({', '.join(map(str, sorted(plan.in_features)))}), "
                "or granularity=channel")
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


def linear_scheme(linear: FakeQuantLinear) -> LinearScheme:
    """What a calibrated Linear holds, as the scheme ``check`` judges (outliers are never a FakeQuantLinear's)."""
    quantizer = linear.input_quantizer
    return LinearScheme(linear.weight_spec, linear.input_spec, quantizer is not None and not quantizer.dynamic,
                        act_order=group_order_index(linear) is not None)


def weight_args(spec: QuantSpec) -> QuantizationArgs:
    """compressed-tensors' description of a ptq weight grid (int, static, signed range)."""
    from compressed_tensors.quantization import QuantizationArgs

    group_size = spec.group_size if spec.granularity == "group" else None
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=spec.granularity,
                            group_size=group_size, dynamic=False)


def input_args(quantizer: ActivationQuantizer | None) -> QuantizationArgs | None:
    """compressed-tensors' description of an input quantizer: dynamic per token, or static per tensor."""
    from compressed_tensors.quantization import QuantizationArgs

    if quantizer is None:
        return None
    spec = quantizer.spec
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=spec.granularity,
                            dynamic=quantizer.dynamic)


def config_groups(linears: dict[str, FakeQuantLinear]) -> dict[str, QuantizationScheme]:
    """One config group per distinct (weight, input) scheme, in module order.

    A single group targets the class ``Linear`` (the ignore list excludes the rest), as llm-compressor writes it;
    mixed precision targets each group's modules by name.
    """
    from compressed_tensors.quantization import QuantizationScheme

    groups: list[tuple[QuantizationArgs, QuantizationArgs | None, list[str]]] = []
    for name, linear in linears.items():
        weights, inputs = weight_args(linear.weight_spec), input_args(linear.input_quantizer)
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


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` of ``module`` (on the meta device) by ``value`` in its shape and dtype."""
    param = getattr(module, name)
    if param.numel() != value.numel():
        raise ValueError(f"compressed-tensors expects {name} {tuple(param.shape)}, ptq holds {tuple(value.shape)}")
    setattr(module, name, nn.Parameter(value.reshape(param.shape).to(param.dtype), requires_grad=False))


def fill(stand_in: nn.Linear, linear: FakeQuantLinear) -> None:
    """Give a stand-in the weight and the qparams ``apply_quantization_config`` created for it (zero points too:
    compressed-tensors creates them for symmetric schemes as well, and drops them when it compresses).

    The weight is s · (q − z) in float32, so that compressed-tensors' rounding of W / s + z recovers q exactly in
    any model dtype; the scales keep the model's dtype (the parameters were created in it).
    """
    spec = linear.weight_spec
    weight = dequantize(linear.weight_int, linear.weight_scale, linear.weight_zero, spec)
    stand_in.weight = nn.Parameter(weight, requires_grad=False)
    set_param(stand_in, "weight_scale", linear.weight_scale)
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
    """Whether transformers must dequantize at load time (asymmetric weight-only: its compressed modules expect
    zero points unpacked, [out, groups], and reject the packed ones with a size mismatch)."""
    (group, *others) = groups.values()
    return not others and group.input_activations is None and not group.weights.symmetric


class CompressedTensorsExporter:
    """Writes calibrated causal LMs as compressed-tensors checkpoints (pack-quantized or int-quantized)."""

    name = NAME

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
                fill(stand_in, linears[name])
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

    A weight-only checkpoint of one config group (pack-quantized) loads dequantized
    (``CompressedTensorsConfig(dequantize=True)``): a plain model whose weights equal the fake-quantized ones — the
    only way transformers 5 loads asymmetric ones, whose packed zero points its compressed modules reject.
    Everything else loads with the defaults: checkpoints that quantize activations (int-quantized), whose
    compressed-tensors forward fake-quantizes each Linear's input (dequantizing would drop that), and mixed
    precision, which transformers' dequantizing load would read with the first group's scheme for every layer.
    Anything that is not a compressed-tensors checkpoint needs nothing.
    """
    config = json.loads((Path(directory) / CONFIG).read_text()).get("quantization_config") or {}
    groups = list(config.get("config_groups", {}).values())
    if config.get("quant_method") != QUANT_METHOD or len(groups) != 1 or groups[0].get("input_activations"):
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
