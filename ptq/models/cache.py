"""A disk cache of models loaded from GGUF files, so only the first run pays for dequantizing them.

The first load saves the model (safetensors weights and config, through ``save_pretrained``) under
``<root>/models/<sha256 of the GGUF file, first 16 hex>-<dtype>-transformers<version>/``; later loads read that
directory. The file's tokenizer can be cached the same way under the name ``TOKENIZER_ENTRY`` in place of a dtype
(parsing a GGUF vocabulary takes longer than reading the cached model). The transformers version is part of the
key because it is transformers that converts GGUF tensors to its own layout. The root is ``$PTQ_CACHE_DIR`` if
set, else ``~/.cache/ptq``.

An entry is written into a temporary directory beside it and renamed into place in one step, so a run killed while
saving leaves no entry that could be read half written; the temporary directory it leaves (named after its host and
process) is removed by the next save on that host once the process is gone. The cache never stops a run: a save
that fails leaves the run with the freshly loaded model, an entry that cannot be read is loaded afresh and replaced,
each said in one line.

transformers (5.x) keeps its GGUF quantizer on a model whose weights it dequantized, which makes ``save_pretrained``
refuse the model although it holds plain float tensors. ``cached_load`` drops that mark from the fresh model
(``drop_dequantized_gguf_marks``), so the first run's model is the same kind of model the cache gives later runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

Model = TypeVar("Model")

CHUNK = 1 << 20
GGUF_METHOD = "gguf"
TOKENIZER_ENTRY = "tokenizer"
"""The ``dtype`` of a cached tokenizer's entry (``tokenizer.save_pretrained`` / ``AutoTokenizer.from_pretrained``)."""


def cache_root() -> Path:
    """``$PTQ_CACHE_DIR``, or ``~/.cache/ptq`` when it is unset or empty."""
    return Path(os.environ.get("PTQ_CACHE_DIR") or "~/.cache/ptq").expanduser()


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (the whole file is read: ~0.2 s for the 98 MB default)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def converter_version() -> str:
    """The installed transformers version (it converts GGUF tensors), or ``none``."""
    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def entry_dir(gguf_path: Path, dtype: str) -> Path:
    """Where the model loaded from ``gguf_path`` in ``dtype`` (or its tokenizer, ``TOKENIZER_ENTRY``) is cached."""
    return cache_root() / "models" / f"{file_digest(gguf_path)}-{dtype}-transformers{converter_version()}"


def partial_prefix(target: Path, pid: int | None = None) -> str:
    """The name prefix of the temporary directories that process ``pid`` (default: this one) saves ``target`` in."""
    return f".{target.name}.{socket.gethostname()}.{os.getpid() if pid is None else pid}."


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> None:
    """Delete the temporary directories that killed processes of this host left while saving ``target``."""
    host_prefix = f".{target.name}.{socket.gethostname()}."
    for path in target.parent.glob(f"{host_prefix}*"):
        pid = path.name[len(host_prefix):].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def save_atomically(save: Callable[[Path], None], target: Path) -> None:
    """Run ``save(tmp)`` into a fresh directory beside ``target``, then rename it to ``target``.

    If another process completed ``target`` first, its entry is kept and ours is discarded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(target), dir=target.parent))
    try:
        save(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_dequantized_gguf_marks(model: Any) -> None:
    """Forget transformers' GGUF quantizer on a model whose GGUF weights were all dequantized to plain tensors.

    A model that still holds packed GGUF layers (transformers keeps them when the ``kernels`` package has a matmul
    kernel for the device) is left as it is; saving it then fails and it is not cached."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) == GGUF_METHOD and not getattr(quantizer, "packed_modules", {}):
        quantizer.remove_quantization_config(model)


def cached_load(gguf_path: Path, dtype: str, load_fresh: Callable[[], Model], load_saved: Callable[[Path], Model],
                save: Callable[[Model, Path], None]) -> Model:
    """The model of ``gguf_path`` in ``dtype``: ``load_saved(entry)`` when cached, else ``load_fresh()``, which is
    then cached with ``save(model, directory)``. An entry that cannot be read is replaced."""
    target = entry_dir(gguf_path, dtype)
    if target.is_dir():
        try:
            return load_saved(target)
        except (OSError, ValueError, RuntimeError) as error:
            print(f"model cache: {target} unreadable, loading afresh ({first_line(error)})", file=sys.stderr)
            shutil.rmtree(target, ignore_errors=True)
    model = load_fresh()
    drop_dequantized_gguf_marks(model)
    try:
        save_atomically(lambda directory: save(model, directory), target)
    except (OSError, ValueError) as error:
        print(f"model cache: not saved in {target.parent} ({first_line(error)})", file=sys.stderr)
    return model


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]
