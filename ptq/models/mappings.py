"""Model-family mappings as data: where the decoder blocks are and which op feeds which linears.

A ``Group`` is one "smoothing group" (SmoothQuant §4, AWQ §3.2): ``prev`` is the op whose output feeds every
linear in ``linears`` (a norm, or a linear whose output channels are those linears' input channels), and
``inspect`` is the module whose output measures the error of a change to the group. One mapping serves every
transform; the order of the groups is the order in which a block computes them (GPTQ's true-sequential order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Group:
    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class Mapping:
    blocks: str
    groups: tuple[Group, ...]

    @property
    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group.linears]


LLAMA = Mapping(
    blocks="model.layers",
    groups=(
        Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
)

MAPPINGS: dict[str, Mapping] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}


class UnknownArchitectureError(ValueError):
    pass


def mapping_for(model: torch.nn.Module) -> Mapping:
    """The mapping registered for ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MAPPINGS:
        raise UnknownArchitectureError(
            f"model_type={model_type!r}: no mapping; known are {', '.join(sorted(MAPPINGS))}. "
            "Add one to ptq.models.mappings.MAPPINGS (blocks path and smoothing groups)."
        )
    return MAPPINGS[model_type]


def blocks_of(model: torch.nn.Module, mapping: Mapping) -> torch.nn.ModuleList:
    return model.get_submodule(mapping.blocks)
