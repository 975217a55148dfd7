"""Data-parallel calibration on ``torch.distributed``: small helpers that are no-ops in a single process.

``torchrun --nproc-per-node N run.py ...`` starts N processes (ranks) with the rendezvous in their environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...); ``init_from_env`` joins them into one process group (NCCL when
CUDA is available, gloo on the CPU). Every rank loads the model and draws the same calibration samples (same
seed), calibrates its ``shard`` of them, and the few places that accumulate statistics combine them across ranks:

- GPTQ's Hessians: ``HessianAccumulator.all_reduce`` (token-weighted mean of H = 2/n Σ x xᵀ, ``weighted_mean``);
- AWQ's mean |x| and SmoothQuant's max |x|: ``ChannelStat.result`` (``all_reduce_sum`` / ``all_reduce_max``);
- static activation ranges: ``Observer.all_reduce`` (min/max: ``all_reduce_min`` / ``all_reduce_max``);
- AWQ's and SmoothQuant's grid-search losses: ``weighted_mean`` over ranks, so every rank picks the same grid point.

GPTQ's solves are spread over ranks (``ptq.transforms.gptq.solve_spread``): rows are independent given H, so each
rank solves its share of each weight's rows and ``gather_rows`` hands every rank the whole result. A block's
outputs are propagated by each rank on its own slice. Rank 0 alone evaluates, logs and writes results and exports
(``is_main``); the others wait for it at a ``barrier``. ``fail_fast`` ends a rank whose run raised with its error
and a non-zero exit, which makes torchrun stop the other ranks.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(hours=12)
"""How long a collective waits for the slowest rank: rank 0 evaluates the baseline while the others wait at the
first all-reduce, which on a large model takes long. A failing rank does not wait for it (``fail_fast``)."""

Result = TypeVar("Result")


def active() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that evaluates, logs and writes."""
    return rank() == 0


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> None:
    """Join the process group that torchrun (or srun with its variables set) describes; nothing in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend(), timeout=TIMEOUT)


def shard(samples: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration samples (dim 0); all of them in one process.

    With ``n_samples`` a multiple of ``world_size × batch_size`` every rank's batches are batches of the single
    process, so the ranks together see exactly its tokens.
    """
    return samples.tensor_split(world_size())[rank()]


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the backend communicates: this rank's GPU for NCCL, the CPU for gloo."""
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    return tensor.to(device)


def _reduced(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """All-reduce ``tensor`` in place with ``dist.ReduceOp.<op>``; returns it."""
    if not active():
        return tensor
    carried = _on_backend(tensor)
    dist.all_reduce(carried, op=getattr(dist.ReduceOp, op))
    tensor.copy_(carried)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over ranks, in place (``tensor`` unchanged in one process); returns ``tensor``."""
    return _reduced(tensor, "SUM")


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduced(tensor, "MAX")


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    return _reduced(tensor, "MIN")


def weighted_mean(values: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """(Σ_r count_r · values_r / Σ_r count_r, Σ_r count_r) over ranks, for per-rank means over ``count`` items
    each; ``(values, count)`` unchanged in one process."""
    if not active():
        return values, count
    total = int(all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())
    summed = all_reduce_sum(values.to(torch.float64) * count)
    return (summed / max(total, 1)).to(values.dtype), total


def row_sizes(rows: int) -> list[int]:
    """How many of ``rows`` each rank solves (contiguous, as even as possible)."""
    return [rows // world_size() + (r < rows % world_size()) for r in range(world_size())]


def gather_rows(part: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The rows that every rank computed (rank r: ``sizes[r]`` rows, ``part`` here), stacked in rank order, on
    every rank."""
    if not active():
        return part
    pieces = []
    for source, rows in enumerate(sizes):
        piece = part if source == rank() else part.new_empty((rows, *part.shape[1:]))
        carried = _on_backend(piece)
        dist.broadcast(carried, src=source)
        pieces.append(carried.to(part.device))
    return torch.cat(pieces)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a decision only rank 0 can make, such as skipping a completed run)."""
    if not active():
        return flag
    value = _on_backend(torch.tensor([1.0 if flag else 0.0]))
    dist.broadcast(value, src=0)
    return bool(value.item())


def barrier() -> None:
    if active():
        dist.barrier()


def fail_fast(run: Callable[[], Result], passthrough: tuple[type[BaseException], ...] = ()) -> Result:
    """``run()``; when it raises on one of several ranks, print the error with the rank and end this process at
    once with exit status 1, so that torchrun's agent stops every other rank instead of leaving them waiting in a
    collective. ``passthrough`` exceptions (errors every rank raises alike, before any collective: a bad config)
    propagate, as every exception does in one process."""
    if not active():
        return run()
    try:
        return run()
    except (SystemExit, *passthrough):
        raise
    except BaseException:  # noqa: BLE001 - any failure of a rank must stop the whole group
        print(f"[rank {rank()}/{world_size()}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(1)


def finish() -> None:
    """The end of a run: every rank waits here until rank 0 has written everything. The process group stays, for
    the next run of a Hydra multirun in the same processes."""
    barrier()
