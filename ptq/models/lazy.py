"""Models larger than host memory: built on the meta device, one decoder block in memory at a time.

``load_lazy`` builds the model's modules without weights (accelerate's ``init_empty_weights``: parameters on the
meta device, buffers such as rotary frequencies real), then loads everything outside the decoder blocks
(embeddings, final norm, LM head) from the checkpoint's safetensors shards. Its ``ShardedBlocks`` is the engine's
``BlockSource`` (``ptq.calibrate``): ``materialize(i, block)`` reads block i's tensors — only that block's keys,
through ``safe_open`` — when the engine reaches it, ``keep(i, block)`` saves the calibrated block (its
``FakeQuantLinear`` integers and grids, rescaled norms) to a per-block safetensors file in a temporary directory
and frees it (back to meta), ``release(i, block)`` frees it unchanged. Later ``materialize`` calls (evaluation,
export) read the kept state. Peak host memory is the embeddings, one block, the calibration activations and the
transform's statistics (GPTQ's Hessians), independent of depth.

``model.lazy`` (``true`` / ``false`` / ``auto``) chooses it; ``auto`` is true for a local directory of plain
safetensors weights larger than ``model.lazy_threshold_gb``. Exports of ptq or compressed-tensors checkpoints and
GGUF files are loaded eagerly.
"""

from __future__ import annotations

import ctypes
import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ptq.models.loading import ResolvedSource, checkpoint_dtype, load_config
from ptq.models.mappings import Mapping, blocks_of, mapping_for
from ptq.nn import set_submodule

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LAZY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose forward adds nothing between the embeddings and the first block (Gemma scales the embeddings
there), so that block-by-block evaluation can hand the last block's output to the model's own head."""
LAZY_SETTINGS = (True, False, "auto")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class LazyLoadError(ValueError):
    """A checkpoint or setting that lazy loading cannot serve (one line, before any weights are read)."""


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Every tensor name of a safetensors checkpoint → the shard that holds it."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    if (directory / SINGLE).is_file():
        with safe_open(directory / SINGLE, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), directory / SINGLE)
    raise LazyLoadError(f"model.lazy=true: {directory} has no {INDEX} or {SINGLE}; allowed are local directories "
                        "of safetensors weights")


def lazy_refusal(source: ResolvedSource | None) -> str | None:
    """Why ``source`` cannot be loaded lazily, or None when it can."""
    if source is None or source.kind != "local" or source.gguf_file:
        return "it is not a local directory of safetensors weights (random models, hub ids and GGUF files load whole)"
    directory = Path(source.location)
    if not ((directory / INDEX).is_file() or (directory / SINGLE).is_file()):
        return f"{directory} holds no safetensors weights"
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    if "quantization_config" in config or (directory / "ptq_quantization.json").is_file():
        return f"{directory} is a quantized checkpoint (a ptq or compressed-tensors export), which loads whole"
    if config.get("model_type") not in LAZY_MODEL_TYPES:
        return f"model_type {config.get('model_type')!r} is not one of {', '.join(LAZY_MODEL_TYPES)}"
    return None


def checkpoint_gb(directory: Path) -> float:
    """Size on disk of a checkpoint's safetensors shards, in GB (10⁹ bytes)."""
    return sum(path.stat().st_size for path in set(checkpoint_files(directory).values())) / 1e9


def wants_lazy(setting: Any, source: ResolvedSource | None, threshold_gb: float) -> bool:
    """Whether ``model.lazy=<setting>`` loads ``source`` lazily; ``LazyLoadError`` when ``true`` cannot."""
    if setting not in LAZY_SETTINGS or isinstance(setting, int) and not isinstance(setting, bool):
        raise LazyLoadError(f"model.lazy={setting!r}: allowed are true, false, auto")
    if not isinstance(threshold_gb, (int, float)) or isinstance(threshold_gb, bool) or threshold_gb < 0:
        raise LazyLoadError(f"model.lazy_threshold_gb={threshold_gb!r}: allowed is a number >= 0")
    if setting is False:
        return False
    refusal = lazy_refusal(source)
    if refusal is not None:
        if setting is True:
            families = ", ".join(LAZY_MODEL_TYPES)
            raise LazyLoadError(f"model.lazy=true: {refusal}; allowed are local safetensors checkpoints of "
                                f"{families} models (model=hf model.source=<dir>), or model.lazy=false")
        return False
    return setting is True or checkpoint_gb(Path(source.location)) > threshold_gb


def block_index(key: str, prefix: str) -> int | None:
    """The block number of checkpoint key ``<prefix>.<i>.…``, or None for a key outside the blocks."""
    match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def read_tensors(files: dict[str, Path], keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``keys`` from their shards (each shard opened once, only those keys read), floating point in ``dtype``."""
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    tensors = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for name in names:
                tensor = handle.get_tensor(name)
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors


class ShardedBlocks:
    """The ``BlockSource`` of a lazily loaded model (see the module docstring)."""

    def __init__(self, files: dict[str, Path], prefix: str, dtype: torch.dtype) -> None:
        self.prefix = prefix
        self.dtype = dtype
        self.keys: dict[int, list[str]] = {}
        for key in files:
            index = block_index(key, prefix)
            if index is not None:
                self.keys.setdefault(index, []).append(key)
        self.files = files
        self._store = tempfile.TemporaryDirectory(prefix="ptq-lazy-blocks-")  # removed with this object
        self._kept: set[int] = set()

    def _kept_path(self, index: int) -> Path:
        return Path(self._store.name) / f"block-{index:05d}.safetensors"

    def materialize(self, index: int, block: nn.Module) -> None:
        """Give ``block`` its tensors: as last kept, else from the checkpoint."""
        if index in self._kept:
            state = load_file(self._kept_path(index))
        else:
            start = len(f"{self.prefix}.{index}.")
            loaded = read_tensors(self.files, self.keys.get(index, []), self.dtype)
            state = {key[start:]: tensor for key, tensor in loaded.items()}
        missing, unexpected = block.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise LazyLoadError(f"model.lazy: block {index} of the checkpoint does not fit the model "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def keep(self, index: int, block: nn.Module) -> None:
        """Save the calibrated ``block`` for later ``materialize`` calls, then free it."""
        state = {key: t.detach().cpu().contiguous().clone() for key, t in block.state_dict().items()}
        save_file(state, self._kept_path(index))
        self._kept.add(index)
        self.release(index, block)

    def release(self, index: int, block: nn.Module) -> None:
        """Free ``block``'s tensors (they stay on the meta device, shapes and modules intact)."""
        block.to("meta")


def return_freed_memory() -> None:
    """Make glibc's malloc hand every freed block over 64 kB back to the system at once.

    By default glibc raises its mmap threshold to the size of the largest block freed so far, so that later
    tensors of a block's size come from the heap, which keeps freed memory: RSS then holds several blocks'
    worth of dead tensors. Fixing the threshold keeps a lazily loaded model at one block. Nothing happens with
    another C library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)


def load_lazy(source: ResolvedSource, dtype: str) -> tuple[nn.Module, ShardedBlocks]:
    """The model of ``source`` with its blocks on the meta device and everything else loaded, and its source of
    blocks."""
    return_freed_memory()
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    torch_dtype = checkpoint_dtype(source, dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(load_config(source), dtype=torch_dtype)
    model.eval()
    mapping = mapping_for(model)
    files = checkpoint_files(Path(source.location))
    outside = [key for key in files if block_index(key, mapping.blocks) is None]
    for key, tensor in read_tensors(files, outside, torch_dtype).items():
        set_module_tensor_to_device(model, key, "cpu", value=tensor)
    model.tie_weights()
    blocks = blocks_of(model, mapping)
    inside = {id(p) for p in blocks.parameters()}
    unloaded = [name for name, p in model.named_parameters() if p.is_meta and id(p) not in inside]
    if unloaded:
        raise LazyLoadError(f"model.lazy: the checkpoint lacks {unloaded[:3]}")
    return model, ShardedBlocks(files, mapping.blocks, torch_dtype)


@contextmanager
def without_blocks(model: nn.Module, mapping: Mapping) -> Iterator[nn.Module]:
    """``model`` with its decoder blocks replaced by an empty list for the duration (its forward then maps
    ``inputs_embeds`` through the final norm and LM head; its state dict holds no block tensors)."""
    blocks = blocks_of(model, mapping)
    set_submodule(model, mapping.blocks, nn.ModuleList())
    try:
        yield model
    finally:
        set_submodule(model, mapping.blocks, blocks)


def model_parts(model: nn.Module, mapping: Mapping, source: ShardedBlocks) -> Iterator[tuple[str, nn.Module]]:
    """The model as pieces for a sharded export (``ptq.export.ExportContext.parts``): first everything outside the
    blocks, then each block, loaded while the consumer holds it and freed when it asks for the next."""
    with without_blocks(model, mapping) as rest:
        yield "", rest
    for index, block in enumerate(blocks_of(model, mapping)):
        source.materialize(index, block)
        yield f"{mapping.blocks}.{index}", block
        source.release(index, block)
