"""Perplexity as the GPTQ and AWQ papers measure it.

The evaluation text is tokenised once and cut into non-overlapping windows of ``seq_len`` tokens; each window
is scored on its own (no context carried over) and perplexity is exp of the mean token negative log-likelihood
over all predicted tokens (Frantar et al. 2022, §5; the ``eval_ppl`` of the AWQ and GPTQ reference code).

The scoring is exact and lean: under ``torch.inference_mode``, each window's logits are scored where the model
wrote them, in float32 (one log-softmax per position, no copy of the full-vocabulary logits: the window's last
position, which predicts no token, is masked out instead of sliced off), one window at a time so that half-precision
logits are upcast a window at a time, never a whole batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IGNORE = -100
"""Target of the positions that predict nothing (``F.cross_entropy``'s ``ignore_index``)."""


def window_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ``tokens[1:]`` under ``logits[:-1]`` for one window: ``logits`` [seq_len, vocab] (any float
    dtype, scored in float32), ``tokens`` [seq_len]."""
    targets = torch.full_like(tokens, IGNORE)
    targets[:-1] = tokens[1:]
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, device: str = "cpu",
               progress: bool = True) -> float:
    """exp(mean NLL) of ``model`` over ``windows`` [n, seq_len] of token ids, ``batch_size`` windows per forward."""
    total_nll, total_tokens = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits
        total_nll += sum(window_nll(row_logits, row).item() for row_logits, row in zip(logits, batch, strict=True))
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def blockwise_perplexity(model: torch.nn.Module, mapping: Any, source: Any, windows: torch.Tensor,
                         batch_size: int = 1, device: str = "cpu", progress: bool = True) -> float:
    """``perplexity`` computed one decoder block at a time, for a model whose blocks ``source`` loads on demand
    (``ptq.models.lazy``): every window's hidden states go through block i, which is then freed, before block
    i + 1 is loaded; the model's own forward, without its blocks, maps the last hidden states to logits. The
    windows are batched as ``perplexity`` batches them, so both compute the same thing."""
    from ptq.calibrate import capture_first_block_inputs, map_tensors
    from ptq.models.lazy import without_blocks
    from ptq.models.mappings import blocks_of

    hidden, kwargs = capture_first_block_inputs(model, mapping, windows, batch_size, torch.device(device))
    kwargs = [map_tensors(kw, lambda t: t.to(device)) for kw in kwargs]
    blocks = blocks_of(model, mapping)
    for index in tqdm(range(len(blocks)), desc="perplexity by block", disable=not progress, leave=False):
        source.materialize(index, blocks[index])
        block = blocks[index].to(device)
        hidden = [_first(block(x, **kw)) for x, kw in zip(hidden, kwargs, strict=True)]
        source.release(index, block.to("cpu"))
    total_nll, total_tokens = 0.0, 0
    with without_blocks(model, mapping):
        model.to(device)
        for x, batch in zip(hidden, windows.split(batch_size), strict=True):
            logits = model(inputs_embeds=x, use_cache=False).logits
            total_nll += sum(window_nll(row_logits, row).item()
                             for row_logits, row in zip(logits, batch.to(device), strict=True))
            total_tokens += batch[:, 1:].numel()
        model.to("cpu")
    return math.exp(total_nll / total_tokens)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output
