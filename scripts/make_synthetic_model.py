"""Write a random-weight Llama or Qwen2 checkpoint of any shape, for memory and scaling tests without downloads.

    python scripts/make_synthetic_model.py /tmp/llama-3gb --hidden 2048 --intermediate 5632 --layers 22 \
        --heads 16 --kv-heads 4

The directory gets ``config.json``, safetensors shards (``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json``), the generation config and the embedded SmolLM2 tokenizer (``ptq.models.loading``),
whose ids the vocabulary must cover. Tensors are made one at a time and each shard is written as soon as it is full,
so the model is never in memory as a whole: peak memory is one shard. Weights are normal with std ``--std`` (0.02,
as transformers initialises), norms are ones, biases (Qwen2's q/k/v) zeros; every tensor is drawn from its own
generator seeded by ``--seed`` and its name, so the checkpoint does not depend on how it is sharded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int | None = None  # None: the tokenizer's size
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Family:
    """How a family names its config and which of its linears carry a bias."""

    config: Callable[..., object]
    biased: tuple[str, ...]


def _llama_config(**kwargs: object) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(**kwargs)


def _qwen2_config(**kwargs: object) -> object:
    from transformers import Qwen2Config

    return Qwen2Config(**kwargs)


FAMILIES: dict[str, Family] = {
    "llama": Family(_llama_config, ()),
    "qwen2": Family(_qwen2_config, ("q_proj", "k_proj", "v_proj")),
}


def tensor_shapes(shape: Shape, vocab: int, family: Family) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, (name, shape), in the order the model uses them."""
    kv = shape.kv_heads * shape.head_dim
    yield "model.embed_tokens.weight", (vocab, shape.hidden)
    linears = {"self_attn.q_proj": (shape.hidden, shape.hidden), "self_attn.k_proj": (kv, shape.hidden),
               "self_attn.v_proj": (kv, shape.hidden), "self_attn.o_proj": (shape.hidden, shape.hidden),
               "mlp.gate_proj": (shape.intermediate, shape.hidden), "mlp.up_proj": (shape.intermediate, shape.hidden),
               "mlp.down_proj": (shape.hidden, shape.intermediate)}
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", (shape.hidden,)
        for name, dims in linears.items():
            yield f"{prefix}.{name}.weight", dims
            if name.rpartition(".")[2] in family.biased:
                yield f"{prefix}.{name}.bias", (dims[0],)
        yield f"{prefix}.post_attention_layernorm.weight", (shape.hidden,)
    yield "model.norm.weight", (shape.hidden,)
    if not shape.tie_embeddings:
        yield "lm_head.weight", (vocab, shape.hidden)


def make_tensor(name: str, dims: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """Ones for norms, zeros for biases, else N(0, std²) from a generator seeded by ``seed`` and ``name``."""
    if name.endswith("norm.weight"):
        return torch.ones(dims)
    if name.endswith(".bias"):
        return torch.zeros(dims)
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(digest)
    return torch.randn(dims, generator=generator) * std


def shard_plan(shapes: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most ``max_shard_bytes`` float32 bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes:
        nbytes = 4 * int(torch.Size(dims).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_model(directory: Path, shape: Shape, family: str = "llama", seed: int = 0, std: float = 0.02,
                max_shard_mb: float = 512) -> Path:
    """Write the checkpoint into ``directory`` (created); returns it."""
    from transformers import GenerationConfig

    from ptq.models.loading import embedded_smollm2, load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(embedded_smollm2())
    vocab = shape.vocab or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"--vocab {vocab}: the embedded tokenizer has {len(tokenizer)} ids; allowed is at least that")
    kind = FAMILIES[family]
    config = kind.config(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tie_embeddings,
                         max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="float32")
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    shapes = dict(tensor_shapes(shape, vocab, kind))
    shards = shard_plan(list(shapes.items()), int(max_shard_mb * 2**20))
    weight_map: dict[str, str] = {}
    total = 0
    for number, names in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: make_tensor(name, shapes[name], seed, std) for name in names}
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=1))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--hidden", type=int, default=Shape.hidden)
    parser.add_argument("--intermediate", type=int, default=Shape.intermediate)
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--heads", type=int, default=Shape.heads)
    parser.add_argument("--kv-heads", type=int, default=Shape.kv_heads)
    parser.add_argument("--vocab", type=int, default=None, help="default: the embedded tokenizer's size")
    parser.add_argument("--untied", action="store_true", help="a separate lm_head (default: tied to the embeddings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--max-shard-mb", type=float, default=512)
    args = parser.parse_args()
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
    shape = Shape(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab,
                  not args.untied)
    directory = write_model(args.directory, shape, args.family, args.seed, args.std, args.max_shard_mb)
    index = json.loads((directory / INDEX).read_text())
    shards = len(set(index["weight_map"].values()))
    print(f"wrote {directory}: {index['metadata']['total_size'] / 2**30:.2f} GiB float32 in {shards} shards")


if __name__ == "__main__":
    main()
