"""Per-channel rescaling that leaves a block's function unchanged, shared by SmoothQuant and AWQ.

For a group (``ptq.models.mappings.Group``) whose linears read the output channels of ``prev``,

    Y = (X diag(s)⁻¹) (W diag(s))ᵀ = X Wᵀ          (SmoothQuant eq. 3; AWQ §3.2, "Q(w·s)·x/s")

so dividing ``prev``'s output channel j by s_j and multiplying column j of every linear by s_j changes nothing
in full precision. ``FOLDS`` holds how each kind of ``prev`` divides its outputs by s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ptq import distributed
from ptq.models.mappings import Group, Mapping


def _divide(tensor: torch.Tensor, s: torch.Tensor) -> None:
    """tensor[..., j] /= s_j over the last len(s) entries of the first dim (rows) or of a vector."""
    rows = tensor[-s.numel():]
    divisor = s.view(-1, *([1] * (rows.dim() - 1)))
    rows.copy_((rows.float() / divisor).to(tensor.dtype))


def fold_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """y = x̂·w + b  →  x̂·(w/s) + b/s."""
    _divide(norm.weight.data, s)
    if getattr(norm, "bias", None) is not None:
        _divide(norm.bias.data, s)


def fold_norm_plus_one(norm: nn.Module, s: torch.Tensor) -> None:
    """y = x̂·(1 + w)  →  x̂·(1 + w'), w' = (1 + w)/s − 1 (Gemma's RMSNorm)."""
    weight = norm.weight.data
    weight.copy_(((1 + weight.float()) / s - 1).to(weight.dtype))
    if getattr(norm, "bias", None) is not None:
        _divide(norm.bias.data, s)


def fold_linear(linear: nn.Module, s: torch.Tensor) -> None:
    """Divide the last len(s) output rows (and bias entries) of a linear: v_proj, or the v / up slice of a fused one."""
    _divide(linear.weight.data, s)
    if linear.bias is not None:
        _divide(linear.bias.data, s)


FOLDS: dict[str, Callable[[nn.Module, torch.Tensor], None]] = {
    "norm": fold_norm,
    "norm_plus_one": fold_norm_plus_one,
    "linear": fold_linear,
}


def outputs_of(module: nn.Module) -> int:
    """How many output channels ``prev`` has (a norm's weight length, a linear's rows)."""
    return module.weight.shape[0]


def scalable_groups(block: nn.Module, mapping: Mapping) -> list[Group]:
    """The groups a rescaler may change: ``prev`` set, and holding at least as many outputs as the linears read.

    A linear ``prev`` with fewer outputs (v_proj under grouped-query attention) is skipped, as AutoAWQ does.
    """
    groups = []
    for group in mapping.groups:
        if group.prev is None:
            continue
        if group.fold not in FOLDS:
            raise ValueError(f"fold={group.fold!r} in the mapping: allowed are {', '.join(FOLDS)}")
        if outputs_of(block.get_submodule(group.prev)) >= block.get_submodule(group.linears[0]).in_features:
            groups.append(group)
    return groups


@torch.no_grad()
def apply_scales(block: nn.Module, group: Group, s: torch.Tensor) -> None:
    """Fold 1/s into ``group.prev`` and s into the input columns of every linear of the group."""
    FOLDS[group.fold](block.get_submodule(group.prev), s)
    for name in group.linears:
        weight = block.get_submodule(name).weight.data
        weight.copy_((weight.float() * s).to(weight.dtype))


def group_weight(block: nn.Module, group: Group) -> torch.Tensor:
    """The group's linears stacked along outputs: [Σ out, in] in float32."""
    return torch.cat([block.get_submodule(name).weight.data.float() for name in group.linears])


class ChannelStat:
    """Per-input-channel max |x| (``reduce="max"``) or mean |x| (``reduce="mean"``) over every token seen.

    Sums are kept in float64, so that how the tokens are split into batches and ranks changes the mean only below
    float32's resolution: a data-parallel run then finds the single process's scales (``ptq.distributed``)."""

    def __init__(self, reduce: str) -> None:
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce={reduce!r}: allowed are max, mean")
        self.reduce = reduce
        self.value: torch.Tensor | None = None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).abs().float()
        batch = x.amax(dim=0) if self.reduce == "max" else x.sum(dim=0, dtype=torch.float64)
        if self.value is None:
            self.value = batch
        else:
            self.value = torch.maximum(self.value, batch) if self.reduce == "max" else self.value + batch
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        """The statistic over every token seen, by every rank of a data-parallel run (``ptq.distributed``)."""
        if self.value is None:
            raise RuntimeError("no activations were observed")
        if self.reduce == "max":
            return distributed.all_reduce_max(self.value.clone())
        tokens = distributed.all_reduce_sum(torch.tensor(float(self.tokens), dtype=torch.float64)).item()
        return (distributed.all_reduce_sum(self.value.clone()) / tokens).float()
