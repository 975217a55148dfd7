"""The block-by-block calibration runner.

GPTQ (Frantar et al. 2022, §4 "Step 3") and AWQ calibrate one decoder block at a time: the inputs of the first
block are captured once; for each block, the transforms observe what they need (Hessians, activation
statistics), change the block, and the block's outputs — computed with the *quantized* block, so that later
blocks see the errors of earlier ones — become the next block's inputs. Only the current block lives on the
compute device. Modules are found by forward hooks, never by tracing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.models.mappings import Mapping, blocks_of
from ptq.nn import as_linears


class _Captured(Exception):
    """Raised inside a forward pass to stop it once the inputs it was run for are recorded."""


@dataclass
class BlockContext:
    """What a transform sees of one block: the block, its calibration inputs and how to run it."""

    block: nn.Module
    index: int
    prefix: str
    mapping: Mapping
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    device: torch.device
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)
    known_outputs: list[torch.Tensor] | None = None  # set by a transform whose own pass already computed them

    def qualified(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        return [_first(self.block(x, **kw)) for x, kw in zip(self.inputs, self.kwargs, strict=False)]

    @torch.no_grad()
    def stream(self, observers: dict[str, Callable[[torch.Tensor], None]]) -> None:
        """Run the block on all inputs, calling ``observers[name](x)`` with each input of module ``name``."""
        self._run({name: _main_input_to(fn) for name, fn in observers.items()})

    @torch.no_grad()
    def capture(self, names: list[str]) -> dict[str, list[tuple[tuple, dict]]]:
        """Run the block on all inputs and keep each (args, kwargs) that modules ``names`` receive."""
        seen: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in names}
        self._run({name: _recorder(seen[name]) for name in names})
        return seen

    @torch.no_grad()
    def run_joined(self, hooks: dict[str, Callable[[nn.Module, tuple, dict], tuple | None]]) -> None:
        """Run the block once on all calibration inputs joined into one batch, with forward pre-hooks.

        ``hooks[name](module, args, kwargs)`` sees module ``name``'s input for every calibration token at once
        and may return new ``(args, kwargs)``, or change the block, before the call proceeds. The block's outputs,
        split back into the calibration batches, become ``known_outputs``.
        """
        x, kwargs = torch.cat(self.inputs), join_kwargs(self.kwargs, [i.shape[0] for i in self.inputs])
        handles = [self.block.get_submodule(name).register_forward_pre_hook(fn, with_kwargs=True)
                   for name, fn in hooks.items()]
        try:
            output = _first(self.block(x, **kwargs))
        finally:
            for handle in handles:
                handle.remove()
        self.known_outputs = list(output.split([i.shape[0] for i in self.inputs]))

    def _run(self, hooks: dict[str, Callable[[tuple, dict], None]]) -> None:
        """Run the block on every batch with ``hooks`` on module inputs; each batch's forward pass stops as soon
        as every hooked module has seen its input (the rest of the block would compute nothing they need)."""
        waiting: set[str] = set()

        def then_stop_when_all_seen(name: str, fn: Callable[[tuple, dict], None]) -> Callable[[tuple, dict], None]:
            def hook(args: tuple, kwargs: dict) -> None:
                fn(args, kwargs)
                waiting.discard(name)
                if not waiting:
                    raise _Captured

            return hook

        with _input_hooks(self.block, {name: then_stop_when_all_seen(name, fn) for name, fn in hooks.items()}):
            for x, kw in zip(self.inputs, self.kwargs, strict=False):
                waiting.update(hooks)
                with suppress(_Captured):
                    self.block(x, **kw)


def join_kwargs(kwargs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """One batch's keyword arguments from several batches' (of ``sizes`` rows each).

    A tensor whose first dimension is each batch's size (an attention mask [B, 1, T, T]) is concatenated;
    anything else (rotary cos/sin [1, T, d], position ids [1, T], flags) must be the same in every batch.
    """
    return {key: _join([kw[key] for kw in kwargs], sizes, key) for key in kwargs[0]}


def _join(values: list[Any], sizes: list[int], key: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        batched = first.dim() > 0 and all(v.shape[0] == n for v, n in zip(values, sizes, strict=True))
        if batched and not (first.shape[0] == 1 and all(torch.equal(v, first) for v in values)):
            return torch.cat(values)
        if all(v.shape == first.shape and torch.equal(v, first) for v in values):
            return first
    elif isinstance(first, (tuple, list)):
        return type(first)(_join(list(parts), sizes, key) for parts in zip(*values, strict=True))
    elif all(v is first or v == first for v in values):
        return first
    raise ValueError(f"calibration batches differ in keyword argument {key!r} and cannot be joined into one batch")


def main_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states argument of a module call, positional or keyword."""
    return args[0] if args else kwargs["hidden_states"]


def replace_main_input(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """The (args, kwargs) of a module call with its hidden-states argument replaced by ``x``."""
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _main_input_to(fn: Callable[[torch.Tensor], None]) -> Callable[[tuple, dict], None]:
    return lambda args, kwargs: fn(main_input(args, kwargs))


def _recorder(store: list) -> Callable[[tuple, dict], None]:
    return lambda args, kwargs: store.append((args, kwargs))


@contextmanager
def _input_hooks(block: nn.Module, hooks: dict[str, Callable[[tuple, dict], None]]) -> Iterator[None]:
    handles = [
        block.get_submodule(name).register_forward_pre_hook(_ignoring_module(fn), with_kwargs=True)
        for name, fn in hooks.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ignoring_module(fn: Callable[[tuple, dict], None]) -> Callable[[nn.Module, tuple, dict], None]:
    return lambda module, args, kwargs: fn(args, kwargs)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockSource(Protocol):
    """Where the engine gets each block's weights: ``EAGER`` for a model in memory; ``ptq.models.lazy`` loads them
    from the checkpoint when a block is reached (``materialize``) and frees them after, keeping a calibrated block
    (``keep``) or dropping an unchanged one (``release``)."""

    def materialize(self, index: int, block: nn.Module) -> None: ...

    def keep(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...


class InMemory:
    """The blocks of a model that is loaded whole: nothing to load, keep or free."""

    def materialize(self, index: int, block: nn.Module) -> None:
        return None

    def keep(self, index: int, block: nn.Module) -> None:
        return None

    def release(self, index: int, block: nn.Module) -> None:
        return None


EAGER: BlockSource = InMemory()


class Transform(Protocol):
    """A calibration step applied to each block in turn (see ``ptq.transforms``)."""

    name: str
    needs_data: bool  # False when the step only looks at weights (RTN): the engine then skips all forward passes

    def apply(self, ctx: BlockContext) -> None: ...


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, mapping: Mapping, samples: torch.Tensor, batch_size: int,
                               device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to its first block and record the block's hidden states and keyword arguments."""
    blocks = blocks_of(model, mapping)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def record(module: nn.Module, args: tuple, kw: dict) -> None:
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden)
        kwargs.append({k: v for k, v in kw.items() if k not in ("past_key_value", "past_key_values")})
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    _move_outside_blocks(model, blocks, device)
    try:
        for batch in samples.split(batch_size):
            with suppress(_Captured):
                model(batch.to(device), use_cache=False)
    finally:
        handle.remove()
        _move_outside_blocks(model, blocks, torch.device("cpu"))
    return inputs, kwargs


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, final norm, rotary)."""
    inside = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in inside:
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if id(buf) not in inside:
                module._buffers[name] = buf.to(device)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it (through tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {key: map_tensors(v, fn) for key, v in value.items()}
    return value


@torch.no_grad()
def calibrate(model: nn.Module, mapping: Mapping, samples: torch.Tensor, transforms: list[Transform],
              device: str | torch.device = "cpu", batch_size: int = 8, propagate: str = "quantized",
              progress: bool = True, source: BlockSource = EAGER) -> dict[str, dict[str, Any]]:
    """Apply ``transforms`` to every block of ``model`` in order; return per-layer logs keyed by module name.

    ``propagate="quantized"`` hands the quantized block's outputs to the next block (GPTQ, AWQ);
    ``propagate="fp"`` hands on the full-precision outputs instead. ``source`` gives each block its weights when
    the loop reaches it and keeps the calibrated block after (``ptq.models.lazy``); a model in memory needs none.
    """
    if propagate not in ("quantized", "fp"):
        raise ValueError(f"calibration.propagate={propagate!r}: allowed are quantized, fp")
    device = torch.device(device)
    model.config.use_cache = False
    blocks = blocks_of(model, mapping)
    needs_data = any(getattr(t, "needs_data", True) for t in transforms)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []
    if needs_data:
        inputs, kwargs = capture_first_block_inputs(model, mapping, samples, batch_size, device)
        kwargs = [map_tensors(kw, lambda t: t.to(device)) for kw in kwargs]  # the same for every block
    logs: dict[str, dict[str, Any]] = {}
    for index in tqdm(range(len(blocks)), desc="calibrate", disable=not progress):
        source.materialize(index, blocks[index])
        block = as_linears(blocks[index]).to(device)
        ctx = BlockContext(block, index, f"{mapping.blocks}.{index}", mapping, inputs, kwargs, device)
        fp_outputs = ctx.outputs() if propagate == "fp" and needs_data else None
        for transform in transforms:
            ctx.known_outputs = None
            transform.apply(ctx)
        if fp_outputs is not None:
            inputs = fp_outputs
        elif needs_data:
            inputs = ctx.known_outputs if ctx.known_outputs is not None else ctx.outputs()
        logs.update(ctx.logs)
        blocks[index] = block.to("cpu")
        source.keep(index, blocks[index])
    return logs
