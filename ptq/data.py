"""Calibration and evaluation text: a registry of corpora, tokenised once and split without overlap.

Every corpus yields a ``TokenSplit``: the token stream calibration samples are drawn from, and the stream
perplexity is measured on. The protocol follows GPTQ (Frantar et al. 2022, §5) and AWQ: documents joined with
"\\n\\n", tokenised once; calibration = ``n_samples`` random windows of ``seq_len`` tokens (seeded);
evaluation = consecutive non-overlapping windows of ``seq_len`` tokens.

The embedded corpus ``pydoc`` is Python's bundled documentation (``pydoc_data.topics``): the topics in sorted
key order joined with "\\n\\n"; the first 70% of its tokens are for calibration, the last 30% for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CALIBRATION_FRACTION = 0.7


class DatasetError(ValueError):
    """A dataset that cannot be read (unknown name, missing file, hub unreachable)."""


@dataclass(frozen=True)
class TokenSplit:
    calibration: torch.Tensor  # 1-D LongTensor
    evaluation: torch.Tensor  # 1-D LongTensor


def pydoc_text() -> str:
    """Python's own documentation topics, sorted by key, joined with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def split_tokens(ids: torch.Tensor, fraction: float = CALIBRATION_FRACTION) -> TokenSplit:
    """First ``fraction`` of a token stream for calibration, the rest for evaluation (never overlapping)."""
    cut = int(len(ids) * fraction)
    return TokenSplit(ids[:cut], ids[cut:])


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _pydoc(tokenizer: Any, path: str | None) -> TokenSplit:
    return split_tokens(tokenize(tokenizer, pydoc_text()))


def _text_file(tokenizer: Any, path: str | None) -> TokenSplit:
    if not path or not Path(path).expanduser().is_file():
        raise DatasetError(f"data.path={path!r}: no such file; allowed is an existing UTF-8 text file (data=text)")
    return split_tokens(tokenize(tokenizer, Path(path).expanduser().read_text(encoding="utf-8")))


def _hub_dataset(name: str, calibration: tuple, evaluation: tuple, column: str) -> Callable[..., TokenSplit]:
    """A corpus from the Hugging Face hub: (path, config, split) for each part, joined with blank lines."""

    def load(tokenizer: Any, path: str | None) -> TokenSplit:
        texts = [_hub_text(name, *part, column) for part in (calibration, evaluation)]
        return TokenSplit(tokenize(tokenizer, texts[0]), tokenize(tokenizer, texts[1]))

    return load


def _hub_text(name: str, path: str, config: str | None, split: str, rows: int | None, column: str) -> str:
    from ptq.models.loading import hub_reachable

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable():
        cached = _cached_dataset(path, config, split)
        if cached is None:
            raise DatasetError(
                f"data={name}: needs the Hugging Face hub, which is unreachable; use data=pydoc (embedded, offline) "
                "or data=text data.path=<file>"
            )
        dataset = cached
    else:
        import datasets

        dataset = datasets.load_dataset(path, config, split=split)
    if rows is not None:
        dataset = dataset.select(range(min(rows, len(dataset))))
    return "\n\n".join(dataset[column])


def _cached_dataset(path: str, config: str | None, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, config, split=split, download_mode="reuse_cache_if_exists")
    except Exception:  # noqa: BLE001 - any failure here means "not usable offline"
        return None


DATASETS: dict[str, Callable[[Any, str | None], TokenSplit]] = {
    "pydoc": _pydoc,
    "text": _text_file,
    "wikitext2": _hub_dataset(
        "wikitext2", ("wikitext", "wikitext-2-raw-v1", "train", None), ("wikitext", "wikitext-2-raw-v1", "test", None),
        "text",
    ),
    "ptb": _hub_dataset(
        "ptb", ("ptb_text_only", "penn_treebank", "train", None), ("ptb_text_only", "penn_treebank", "test", None),
        "sentence",
    ),
    "c4": _hub_dataset(
        "c4",
        ("allenai/c4", "en", "train[:20000]", None),
        ("allenai/c4", "en", "validation[:1100]", None),
        "text",
    ),
}


def load_tokens(name: str, tokenizer: Any, path: str | None = None) -> TokenSplit:
    """Tokenised calibration and evaluation streams of a registered corpus."""
    if name not in DATASETS:
        raise DatasetError(f"data.name={name!r}: allowed are {', '.join(DATASETS)}")
    return DATASETS[name](tokenizer, path)


def calibration_samples(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens, [n_samples, seq_len], reproducible from ``seed``."""
    if len(tokens) <= seq_len:
        raise DatasetError(f"data.seq_len={seq_len}: the calibration text has only {len(tokens)} tokens")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n_samples,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def evaluation_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seq_len]; the incomplete tail is dropped (as GPTQ/AWQ do)."""
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DatasetError(f"eval.seq_len={seq_len}: the evaluation text has only {len(tokens)} tokens")
    return tokens[: n * seq_len].reshape(n, seq_len)
