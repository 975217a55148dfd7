"""Perplexity as the GPTQ and AWQ papers measure it.

The evaluation text is tokenised once and cut into non-overlapping windows of ``seq_len`` tokens; each window
is scored on its own (no context carried over) and perplexity is exp of the mean token negative log-likelihood
over all predicted tokens (Frantar et al. 2022, §5; the ``eval_ppl`` of the AWQ and GPTQ reference code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, device: str = "cpu",
               progress: bool = True) -> float:
    """exp(mean NLL) of ``model`` over ``windows`` [n, seq_len] of token ids."""
    total_nll, total_tokens = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
