"""ptq's own checkpoint: the integers, scales and zero points calibration decided, packed, in one safetensors file.

It holds every scheme ptq calibrates (2..8 bits, symmetric or asymmetric, tensor / channel / group with a ragged
last group, GPTQ's act-order index, static or dynamic activation specs, mixed precision) and is read back into
the same fake-quantized model, bit for bit (``load_ptq_checkpoint``; ``run.py model=hf model.source=<dir>``).

Layout of ``<dir>``:

- ``model.safetensors`` (a lazily loaded model, ``ptq.models.lazy``: one shard per decoder block and one for the rest,
  ``model-0000k-of-0000n.safetensors`` listed in ``model.safetensors.index.json``): for each quantized Linear
  ``<name>``: ``<name>.qweight`` — for ≤ 4 bits the unsigned codes q − qmin packed as int4 nibbles, 8 per int32 along
  the input dimension (``ptq.affine.pack_int4``, the row zero-padded to a multiple of 8), [out, ⌈in/8⌉]; for 5..8 bits
  q itself as int8 (symmetric) or uint8 (asymmetric), [out, in]; ``<name>.weight_scale`` [out, groups] in the spec's
  ``scale_dtype`` (exact: the scales were rounded to it before use); ``<name>.weight_zero`` uint8 (asymmetric only);
  ``<name>.g_idx`` int32 [in] (act-order only: the group of each input column); ``<name>.input_scale`` /
  ``<name>.input_zero`` (static activations). Every other tensor of the model's state dict as it is (a tied copy is
  stored once).
- ``ptq_quantization.json``: the manifest — format version, each quantized Linear's weight spec, activation spec
  and whether its activation qparams are static, the tied tensors, the online modules (QuaRot's Hadamards and the
  KV-cache quantizers, ``ptq.export.online``) and a description of the run.
- ``config.json``, ``generation_config.json`` and the tokenizer files of a transformers model.

The seeds' exercise (int8 state dict vs fp32 ``torch.save``): ``run.py model=digits_mlp method=rtn bits=8
export=ptq`` reports the file's size beside the fp32 size, per channel and (with ``granularity=tensor``) per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ptq.affine import SCALE_TORCH_DTYPES, expand, pack_int4, pad_to_multiple, unpack_int4
from ptq.export.base import ExportContext, ExportPlan, calibrated_linears, group_order_index, refuse
from ptq.export.online import install_online_modules, online_module_entries
from ptq.nn import ActivationQuantizer, FakeQuantLinear, as_linears, set_submodule
from ptq.spec import QuantSpec

MANIFEST = "ptq_quantization.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # a lazily loaded model's export: one shard per block
FORMAT_VERSION = 1
NIBBLE_BITS = 4
PACK = 8  # nibbles per int32 word
LAYER_TENSORS = ("qweight", "weight_scale", "weight_zero", "g_idx", "input_scale", "input_zero")


def pack_codes(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The stored form of codes ``q`` [out, in]: int4 nibbles of q − qmin (integers of ≤ 4 bits), else the codes
    in ``spec.code_dtype`` (int8/uint8; float elements as float8, which holds FP4's values exactly)."""
    if spec.bits <= NIBBLE_BITS and not spec.grid.is_float:
        return pack_int4(pad_to_multiple(q.to(torch.int32) - spec.qmin, PACK))
    return q.to(spec.code_dtype)


def unpack_codes(stored: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the codes [out, in] in ``spec.code_dtype``."""
    if spec.bits <= NIBBLE_BITS and not spec.grid.is_float:
        return (unpack_int4(stored)[:, :in_features].to(torch.int16) + spec.qmin).to(spec.code_dtype)
    return stored


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                     g_idx: torch.Tensor | None) -> torch.Tensor:
    """s · (q − z) in float32, each column with its group's (s, z): through ``g_idx`` when columns are permuted
    (act-order), else the plain layout (``ptq.affine.expand``)."""
    if g_idx is None:
        s, z = expand(scale.float(), spec, q.shape[-1]), expand(zero.float(), spec, q.shape[-1])
    else:
        s, z = scale.float()[:, g_idx.long()], zero.float()[:, g_idx.long()]
    return s * (q.float() - z)


def layer_tensors(name: str, linear: FakeQuantLinear) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized Linear (see the module docstring)."""
    spec = linear.weight_spec
    tensors = {"qweight": pack_codes(linear.weight_int, spec),
               "weight_scale": linear.weight_scale.to(SCALE_TORCH_DTYPES[spec.scale_dtype])}
    if not spec.symmetric:
        tensors["weight_zero"] = linear.weight_zero.to(torch.uint8)
    g_idx = group_order_index(linear)
    if g_idx is not None:
        tensors["g_idx"] = g_idx.to(torch.int32)
    quantizer = linear.input_quantizer
    if quantizer is not None and not quantizer.dynamic:
        tensors["input_scale"], tensors["input_zero"] = quantizer.scale.float(), quantizer.zero.float()
    return {f"{name}.{key}": value.detach().cpu().clone() for key, value in tensors.items()}  # own storage each


def layer_entry(linear: FakeQuantLinear) -> dict[str, Any]:
    """The manifest's record of one quantized Linear."""
    quantizer = linear.input_quantizer
    return {
        "in_features": linear.in_features,
        "out_features": linear.out_features,
        "weight": dataclasses.asdict(linear.weight_spec),
        "activations": None if quantizer is None else dataclasses.asdict(quantizer.spec),
        "static_activations": quantizer is not None and not quantizer.dynamic,
        "activation_clip_ratio": 1.0 if quantizer is None else quantizer.clip_ratio,
    }


def other_tensors(model: nn.Module, quantized: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without the quantized Linears' weights and grids (their biases stay), each shared tensor
    once; and the tied names, {dropped copy: stored name}."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_of: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, tensor in model.state_dict().items():
        owner = next((name for name in quantized if key.startswith(f"{name}.")), None)
        if owner is not None and key != f"{owner}.bias":
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in first_of:
            tied[key] = first_of[identity]
            continue
        first_of[identity] = key
        kept[key] = tensor.detach().cpu().contiguous()
    return kept, tied


class PtqExporter:
    """``export=ptq``: every FakeQuantLinear's integers, packed, with its grid, in one safetensors file."""

    name = "ptq"
    options: dict[str, tuple[str, ...]] = {}
    stores_online_modules = True  # ptq.export.online: rebuilt on load
    def check(self, plan: ExportPlan) -> None:
        for scheme in plan.schemes:
            if scheme.outliers:
                raise refuse(self.name, f"{scheme.describe()}: LLM.int8() keeps every Linear's full-precision "
                             "weight for the outlier columns it finds at run time, so nothing is smaller to store",
                             "are methods without run-time outliers (rtn, gptq, awq, smoothquant, mixed)")

    sharded = True  # takes ``context.parts``: writes a lazily loaded model one block per shard

    def write(self, model: nn.Module, directory: Path, context: ExportContext) -> Path:
        parts = context.parts() if context.parts is not None else iter([("", model)])
        entries: dict[str, Any] = {}
        tied: dict[str, str] = {}
        online: dict[str, dict[str, Any]] = {}
        shards: list[tuple[Path, list[str]]] = []
        for prefix, part in parts:
            tensors, part_entries, part_tied = part_tensors(prefix, part)
            entries.update(part_entries)
            tied.update(part_tied)
            online.update({qualify(prefix, name): entry for name, entry in online_module_entries(part).items()})
            path = directory / f"part-{len(shards):05d}.safetensors"
            save_file(tensors, path, metadata={"format": "pt"})
            shards.append((path, list(tensors)))
            del tensors
        name_shards(directory, shards)
        manifest = {"format": self.name, "version": FORMAT_VERSION, "description": context.description,
                    "layers": entries, "tied": tied, "online": online}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if isinstance(model, PreTrainedModel):
            model.config.save_pretrained(directory)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(directory)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(directory)
        return directory


def qualify(prefix: str, name: str) -> str:
    """``name`` inside the piece of the model at ``prefix`` ("" for the whole model)."""
    return f"{prefix}.{name}" if prefix else name


def part_tensors(prefix: str, part: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """The stored tensors, manifest entries and tied names of one piece of the model (``prefix`` "" for all)."""
    qualified = functools.partial(qualify, prefix)
    layers = calibrated_linears(part)
    tensors, tied = other_tensors(part, set(layers))
    for name, linear in layers.items():
        tensors.update(layer_tensors(name, linear))
    return ({qualified(key): value for key, value in tensors.items()},
            {qualified(name): layer_entry(linear) for name, linear in layers.items()},
            {qualified(copy): qualified(stored) for copy, stored in tied.items()})


def name_shards(directory: Path, shards: list[tuple[Path, list[str]]]) -> None:
    """Rename written parts to ``model.safetensors`` (one part) or to transformers' shard names with an index."""
    if len(shards) == 1:
        shards[0][0].rename(directory / WEIGHTS)
        return
    weight_map = {}
    for number, (path, keys) in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        path.rename(directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum((directory / n).stat().st_size for n in set(weight_map.values()))},
             "weight_map": weight_map}
    (directory / SHARD_INDEX).write_text(json.dumps(index, indent=1))


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a ptq checkpoint: ``model.safetensors``, or the shards its index lists."""
    if not (directory / SHARD_INDEX).is_file():
        return load_file(directory / WEIGHTS)
    names = sorted(set(json.loads((directory / SHARD_INDEX).read_text())["weight_map"].values()))
    return {key: value for name in names for key, value in load_file(directory / name).items()}


def is_ptq_checkpoint(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


@dataclasses.dataclass
class StoredLayer:
    """One quantized Linear as read back: its spec, integers, grid, act-order index and activation quantizer."""

    weight_spec: QuantSpec
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    input_quantizer: ActivationQuantizer | None

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_codes(self.q, self.scale, self.zero, self.weight_spec, self.g_idx)


def read_checkpoint(directory: Path) -> tuple[dict[str, StoredLayer], dict[str, torch.Tensor], dict[str, Any]]:
    """The quantized layers, the other tensors (tied copies restored) and the manifest of a ptq checkpoint."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"model.source={str(directory)!r}: ptq checkpoint version {manifest.get('version')!r}; "
                         f"this ptq reads version {FORMAT_VERSION}")
    tensors = load_weights(directory)
    layers = {name: stored_layer(name, entry, tensors) for name, entry in manifest["layers"].items()}
    owned = {f"{name}.{key}" for name in layers for key in LAYER_TENSORS}
    rest = {key: value for key, value in tensors.items() if key not in owned}
    rest.update({copy: rest[stored] for copy, stored in manifest["tied"].items()})
    return layers, rest, manifest


def stored_layer(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> StoredLayer:
    spec = QuantSpec(**entry["weight"])
    scale = tensors[f"{name}.weight_scale"].float()
    zero = tensors[f"{name}.weight_zero"].float() if not spec.symmetric else torch.zeros_like(scale)
    g_idx = tensors.get(f"{name}.g_idx")
    quantizer = None
    if entry["activations"] is not None:
        act_spec = QuantSpec(**entry["activations"])
        quantizer = ActivationQuantizer(act_spec, tensors[f"{name}.input_scale"], tensors[f"{name}.input_zero"]) \
            if entry["static_activations"] else ActivationQuantizer(act_spec, clip_ratio=entry["activation_clip_ratio"])
    q = unpack_codes(tensors[f"{name}.qweight"], spec, entry["in_features"])
    return StoredLayer(spec, q, scale, zero, None if g_idx is None else g_idx.long(), quantizer)


def load_ptq_checkpoint(directory: Path, dtype: str = "auto") -> nn.Module:
    """The transformers model of a ptq checkpoint, its quantized Linears rebuilt as the run left them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptq.models.loading import DTYPES

    config = AutoConfig.from_pretrained(directory)
    torch_dtype = DTYPES.get(dtype) or getattr(config, "dtype", None) or torch.float32
    model = as_linears(AutoModelForCausalLM.from_config(config, dtype=torch_dtype))  # as calibration saw it
    layers, rest, manifest = read_checkpoint(directory)
    if manifest.get("online"):
        from ptq.models import mapping_for

        install_online_modules(model, manifest["online"], mapping_for(model).kv_hook)
    for name, layer in layers.items():
        set_submodule(model, name, FakeQuantLinear(model.get_submodule(name), layer.weight, layer.weight_spec,
                                                   layer.scale, layer.zero, layer.q, layer.g_idx,
                                                   layer.input_quantizer))
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [key for key in missing if not any(key.startswith(f"{name}.") for name in layers)]
    if missing or unexpected:
        raise ValueError(f"model.source={str(directory)!r}: the checkpoint does not fit its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
