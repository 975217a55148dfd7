"""Model-family mappings as data: where the decoder blocks are and which op feeds which linears.

A ``Group`` is one "smoothing group" (SmoothQuant §4, AWQ §3.2): ``prev`` is the op whose output channels are
the input channels of every linear in ``linears`` (a norm, or a linear), and ``inspect`` is the module whose
output measures the error of a change to the group ("" is the whole block). A rescaler multiplies the linears'
input columns by s and folds 1/s into ``prev``; ``fold`` names how (``ptq.transforms.scaling.FOLDS``):

- ``norm``: y = x̂·w (+ b), RMSNorm and LayerNorm: w/s (and b/s);
- ``norm_plus_one``: y = x̂·(1 + w), Gemma's RMSNorm: w' = (1 + w)/s − 1;
- ``linear``: the *last* len(s) output rows of a linear (and its bias): all rows of v_proj, the v slice of a
  fused q|k|v projection, the up half of a fused gate|up projection.

``prev=None`` marks linears that are quantized but never rescaled (nothing before them can absorb 1/s, e.g.
GPT-2's c_proj after GELU). ``mha_only`` marks the attention-output group: the v channels line up with o_proj's
inputs only when every query head has its own value head; under grouped-query attention ``mapping_for``
drops the group from scaling (as AutoAWQ does) and o_proj is still quantized. One mapping serves every
transform; the groups are in the order a block computes them (GPTQ's true-sequential order).

For rotations and the KV cache (``ptq.transforms.rotation``, ``ptq.kv_cache``): ``norm`` is the kind of the
block's norms (``rmsnorm``: pre-norm RMSNorm only, which commutes with a rotation of the residual stream;
``layernorm``: LayerNorm, which subtracts the mean; ``sandwich``: RMSNorm also on each sublayer's output before the
residual add, Gemma 2/3), ``final_norm`` the norm before the LM head (named beside the block list: ``norm`` is
``model.norm`` for ``model.layers``), ``attention`` the block's attention module, and ``kv_hook`` how keys and values
after RoPE are reached (``attention_interface``: transformers' AttentionInterface call, which sees queries, keys and
values; ``layer_past``: the cache argument's ``update``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from ptq.nn import LINEAR_TYPES


@dataclass(frozen=True)
class Group:
    prev: str | None
    linears: tuple[str, ...]
    inspect: str
    fold: str = "norm"
    mha_only: bool = False


@dataclass(frozen=True)
class Mapping:
    blocks: str
    groups: tuple[Group, ...]
    smoothquant_alpha: float = 0.5  # the migration strength the SmoothQuant authors report for the family
    requires: tuple[tuple[str, object], ...] = ()  # (config attribute, value) pairs this layout needs
    norm: str = "rmsnorm"  # rmsnorm | layernorm | sandwich: only rmsnorm blocks can be rotated
    final_norm: str = "norm"
    attention: str = "self_attn"
    kv_hook: str = "attention_interface"  # attention_interface | layer_past

    @property
    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group.linears]

    def modules(self) -> set[str]:
        """Every module name the groups refer to (the block itself is "")."""
        return {name for g in self.groups for name in (g.prev, g.inspect, *g.linears) if name}


def llama_like(norm_fold: str = "norm", mlp_norm: str = "post_attention_layernorm", alpha: float = 0.8,
               blocks: str = "model.layers") -> Mapping:
    """Llama's block: norm → q,k,v → o; norm → gate,up → down (Mistral, Qwen2/3, the Gemmas differ in data)."""
    return Mapping(
        blocks=blocks,
        groups=(
            Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn",
                  norm_fold),
            Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", "linear", mha_only=True),
            Group(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", norm_fold),
            Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"),
        ),
        smoothquant_alpha=alpha,
    )


LLAMA = llama_like()
GEMMA = llama_like(norm_fold="norm_plus_one")
# Gemma 2/3: post_attention_layernorm normalises the attention *output*; the MLP reads pre_feedforward_layernorm.
GEMMA2 = replace(llama_like(norm_fold="norm_plus_one", mlp_norm="pre_feedforward_layernorm"), norm="sandwich")
GEMMA3_MULTIMODAL = replace(GEMMA2, blocks="model.language_model.layers")

PHI3 = Mapping(
    blocks="model.layers",
    groups=(
        Group("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        Group("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", "linear", mha_only=True),
        Group("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        Group("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"),
    ),
    smoothquant_alpha=0.8,
)

# OPT's fc2 reads ReLU(fc1(x)); ReLU(x/s) = ReLU(x)/s for s > 0, so fc1 can absorb 1/s. OPT-350m normalises
# *after* attention and MLP (do_layer_norm_before=False): there the norms feed the next sublayer's residual, not
# the linears, so only the linear-to-linear groups can be rescaled.
OPT = Mapping(
    blocks="model.decoder.layers",
    groups=(
        Group("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Group("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", "linear", mha_only=True),
        Group("final_layer_norm", ("fc1",), "fc1"),
        Group("fc1", ("fc2",), "fc2", "linear"),
    ),
    requires=(("do_layer_norm_before", True),),
    norm="layernorm",
    final_norm="final_layer_norm",
)
OPT_POST_LN = replace(OPT, groups=tuple(replace(g, prev=None) if g.fold == "norm" else g for g in OPT.groups),
                      requires=(("do_layer_norm_before", False),))

# GPT-2's Conv1D layers hold [in, out] weights; ``ptq.nn.as_linears`` turns them into nn.Linear per block.
GPT2 = Mapping(
    blocks="transformer.h",
    groups=(
        Group("ln_1", ("attn.c_attn",), "attn"),
        Group("attn.c_attn", ("attn.c_proj",), "attn.c_proj", "linear"),
        Group("ln_2", ("mlp.c_fc",), "mlp"),
        Group(None, ("mlp.c_proj",), "mlp.c_proj"),
    ),
    norm="layernorm",
    final_norm="ln_f",
    attention="attn",
)

# Falcon has three block layouts under one model_type: two norms in parallel (40B/180B), sequential attention
# and MLP (RW-1B), one norm feeding both in parallel (7B). Its fused q|k|v is interleaved per head and the MLP
# has GELU, so dense and dense_4h_to_h are quantized but not rescaled (as AutoAWQ does).
_FALCON_OUT = (Group(None, ("self_attention.dense",), "self_attention.dense"),
               Group(None, ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h"))
_FALCON = dict(norm="layernorm", final_norm="ln_f", attention="self_attention", kv_hook="layer_past")
FALCON = (
    Mapping("transformer.h", (Group("ln_attn", ("self_attention.query_key_value",), "self_attention"),
                              Group("ln_mlp", ("mlp.dense_h_to_4h",), "mlp"), *_FALCON_OUT), 0.6, **_FALCON),
    Mapping("transformer.h", (Group("input_layernorm", ("self_attention.query_key_value",), "self_attention"),
                              Group("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"), *_FALCON_OUT), 0.6,
            **_FALCON),
    Mapping("transformer.h", (Group("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h"), ""),
                              *_FALCON_OUT), 0.6, **_FALCON),
)

# HF model_type → mapping, or several layouts of one model_type: the first that ``fits`` the model is used.
MAPPINGS: dict[str, Mapping | tuple[Mapping, ...]] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "gemma3": GEMMA3_MULTIMODAL,
    "phi3": PHI3,
    "opt": (OPT, OPT_POST_LN),
    "gpt2": GPT2,
    "falcon": FALCON,
}


class UnknownArchitectureError(ValueError):
    pass


def mapping_for(model: nn.Module) -> Mapping:
    """The mapping of ``model``: registered for its ``config.model_type``, else inferred from module names.

    Under grouped-query attention the ``mha_only`` groups are kept for quantization but not rescaled.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    registered = MAPPINGS.get(model_type)
    if registered is None:
        mapping = infer_mapping(model)
    else:
        variants = registered if isinstance(registered, tuple) else (registered,)
        mapping = next((m for m in variants if fits(model, m)), None)
        if mapping is None:
            raise UnknownArchitectureError(
                f"model_type={model_type!r}: the blocks of this model match none of the mappings registered for "
                "it; fix its entry in ptq.models.mappings.MAPPINGS"
            )
    return mapping if multi_head_attention(config) else without_mha_only_scaling(mapping)


def multi_head_attention(config: object) -> bool:
    """True unless the (text) config has fewer key/value heads than query heads."""
    text = text_config(config)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return kv_heads == heads


def text_config(config: object) -> object:
    """The language model's config (a multimodal config's text part)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def without_mha_only_scaling(mapping: Mapping) -> Mapping:
    groups = tuple(replace(g, prev=None) if g.mha_only else g for g in mapping.groups)
    return replace(mapping, groups=groups)


def blocks_of(model: nn.Module, mapping: Mapping) -> nn.ModuleList:
    return model.get_submodule(mapping.blocks)


def fits(model: nn.Module, mapping: Mapping) -> bool:
    """Whether the config has what ``mapping`` requires, its blocks exist and its groups name exactly the linears
    of the first block."""
    try:
        block = blocks_of(model, mapping)[0]
    except (AttributeError, IndexError, TypeError):
        return False
    config = text_config(getattr(model, "config", None))
    if any(getattr(config, key, None) != value for key, value in mapping.requires):
        return False
    present = dict(block.named_modules())
    return mapping.modules() <= set(present) and set(mapping.linear_names) == set(linear_names(block))


def linear_names(module: nn.Module) -> list[str]:
    """Names of the linear layers (nn.Linear or GPT-2's Conv1D) inside ``module``."""
    return [name for name, m in module.named_modules() if isinstance(m, LINEAR_TYPES)]


def infer_mapping(model: nn.Module) -> Mapping:
    """The groups of an unregistered architecture, when its blocks name their modules like exactly one known layout.

    Blocks are the one ModuleList of identical, linear-holding modules with the most entries; how each norm folds
    is probed (``fold_of``), not read from the name.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    hint = (f"model_type={model_type!r}: no mapping registered and none can be inferred ({{why}}); add one to "
            "ptq.models.mappings.MAPPINGS: the blocks' path and their groups (prev, linears, inspect)")
    paths = block_lists(model)
    if len(paths) != 1:
        raise UnknownArchitectureError(hint.format(why=f"{len(paths)} candidate block lists"))
    layouts = {replace(m, blocks=paths[0], smoothquant_alpha=0.5,
                       groups=tuple(replace(g, fold="norm") for g in m.groups))
               for entry in MAPPINGS.values() for m in (entry if isinstance(entry, tuple) else (entry,))}
    matches = [m for m in layouts if fits(model, m)]
    if len(matches) != 1:
        raise UnknownArchitectureError(hint.format(why=f"{len(matches)} known layouts match its module names"))
    block = blocks_of(model, matches[0])[0]
    groups = tuple(g if g.prev is None else _probed(g, block.get_submodule(g.prev)) for g in matches[0].groups)
    return replace(matches[0], groups=groups)


def _probed(group: Group, prev: nn.Module) -> Group:
    fold = fold_of(prev)
    return replace(group, fold=fold) if fold else replace(group, prev=None)


def block_lists(model: nn.Module) -> list[str]:
    """Paths of the longest ModuleLists whose entries share one class and hold linears."""
    lists = {name: len(m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1 and linear_names(m[0])}
    longest = max(lists.values(), default=0)
    return [name for name, length in lists.items() if length == longest]


@torch.no_grad()
def fold_of(module: nn.Module) -> str | None:
    """How ``module`` absorbs 1/s: "linear"; "norm" if it multiplies by w, "norm_plus_one" if by (1 + w) (probed
    with w = 0); None for a norm without a weight."""
    if isinstance(module, LINEAR_TYPES):
        return "linear"
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    probe = copy.deepcopy(module).float()
    for param in probe.parameters():
        param.zero_()
    x = torch.randn(2, probe.weight.shape[0], generator=torch.Generator().manual_seed(0))
    return "norm" if probe(x).abs().max() == 0 else "norm_plus_one"
