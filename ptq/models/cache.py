"""A disk cache of models loaded from GGUF files, so only the first run pays for dequantizing them.

The first load saves the model (safetensors weights and config, through ``save_pretrained``) under
``<root>/models/<sha256 of the GGUF file, first 16 hex>-<dtype>/``; later loads read that directory. The root is
``$PTQ_CACHE_DIR`` if set, else ``~/.cache/ptq``. An entry is written into a temporary directory beside it and
renamed into place in one step, so a run killed while saving leaves no entry that could be read half written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

Model = TypeVar("Model")

CHUNK = 1 << 20


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


def entry_dir(gguf_path: Path, dtype: str) -> Path:
    """Where the model loaded from ``gguf_path`` in ``dtype`` is cached."""
    return cache_root() / "models" / f"{file_digest(gguf_path)}-{dtype}"


def save_atomically(save: Callable[[Path], None], target: Path) -> None:
    """Run ``save(tmp)`` into a fresh directory beside ``target``, then rename it to ``target``.

    If another process completed ``target`` first, its entry is kept and ours is discarded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_load(gguf_path: Path, dtype: str, load_fresh: Callable[[], Model], load_saved: Callable[[Path], Model],
                save: Callable[[Model, Path], None]) -> Model:
    """The model of ``gguf_path`` in ``dtype``: ``load_saved(entry)`` when cached, else ``load_fresh()``, which is
    then cached with ``save(model, directory)``."""
    target = entry_dir(gguf_path, dtype)
    if target.is_dir():
        return load_saved(target)
    model = load_fresh()
    save_atomically(lambda directory: save(model, directory), target)
    return model
