"""SpinQuant's learned rotations: R1 and R2 trained by Cayley SGD against the quantized network's loss.

Liu et al. 2024, "SpinQuant: LLM Quantization with Learned Rotations", §3.2: with the weights frozen, minimise the
next-token cross-entropy of the network whose linear inputs and KV cache are fake-quantized,

    min over R1, R2 ∈ Stiefel   L_Q(R1, R2 | W, X)                                            (eq. 2)

by Cayley SGD on the Stiefel manifold (Li, Fuxin, Todorovic 2020, "Efficient Riemannian optimization on the
Stiefel manifold via the Cayley transform", Alg. 2). For each rotation R with Euclidean gradient G = ∂L/∂R:

    M ← β M + G                                    momentum on the gradient
    A = M Rᵀ − R Mᵀ                                skew-symmetric: −A R is a descent direction on the manifold
    α = min(lr_t, 1 / ‖A‖₁)                        the step bound of SpinQuant's optimizer; lr_t cosine-annealed
    R ← (I + α/2 A)⁻¹ (I − α/2 A) R                the Cayley transform of a skew matrix is orthogonal

so R stays a rotation to float64 precision. Rounding passes gradients straight through (Bengio et al. 2013).
SpinQuant's released optimizer runs this without momentum (β = 0, lr 1.5): the default here. With β = 0.9 each
step is about ten times longer, and on the embedded default the learned rotations then raise the quantized loss
on windows they were not trained on (``scripts/spinquant_step_probe.py``).
The weights stay in full precision while the rotations are learned (a quantizer step after the rotation rounds them);
the online Hadamards R3 and R4 are in place, as at inference. Cost is bounded by ``iterations`` (one forward and
backward pass of ``batch_size`` windows of at most ``seq_len`` tokens each), drawn in turn from the first
``samples`` calibration windows. SpinQuant's own runs: 100 iterations, 800 windows of 2048 tokens, lr 1.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ptq.kv_cache import KVQuantizer, KVSpec, attention_hooks, head_dim_of
from ptq.models.mappings import Mapping, blocks_of
from ptq.nn import ActivationQuantizer
from ptq.spec import QuantSpec

if TYPE_CHECKING:
    from ptq.transforms.rotation import Plan

Rotated = list[tuple["Plan", torch.Tensor]]  # (plan, rotation) pairs, as ptq.transforms.rotation.rotation_plans


class StraightThrough(nn.Module):
    """q(x) in the forward pass, the identity in the backward pass."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.quantizer(x) - x).detach()


def cayley_step(r: torch.Tensor, momentum: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD update of the orthogonal ``r`` along the (momentum) gradient ``momentum``."""
    a = momentum @ r.T - r @ momentum.T
    alpha = min(lr, 1 / (a.abs().sum(dim=0).max().item() + 1e-12))
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return torch.linalg.solve(eye + alpha / 2 * a, (eye - alpha / 2 * a) @ r)


def rotated_parameters(base: dict[str, torch.Tensor], plans: Rotated, rotations: list[torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """Every planned parameter with its rotations applied in order (differentiable in the rotations)."""
    out = dict(base)
    for (plan, _), rotation in zip(plans, rotations, strict=True):
        for name, fn in plan:
            out[name] = fn(out[name], rotation)
    return out


@dataclass
class CayleyOptions:
    """How R1 and R2 are learned (SpinQuant §3.2); the quantizers are those the loss is measured under."""

    iterations: int = 20
    samples: int = 8
    batch_size: int = 1
    seq_len: int | None = 256
    lr: float = 1.5
    momentum: float = 0.0
    activation_bits: int = 4
    kv_bits: int | None = 4
    progress: bool = True
    losses: list[float] = field(default_factory=list, init=False)  # the quantized loss at every iteration

    def __post_init__(self) -> None:
        for key in ("iterations", "samples", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"learn.{key}={value!r}: allowed is a positive integer")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ValueError(f"learn.seq_len={self.seq_len!r}: allowed is an integer >= 2 or null")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"learn.lr={self.lr!r}, learn.momentum={self.momentum!r}: allowed are lr > 0 and "
                             "momentum in [0, 1)")
        self._activations = QuantSpec(bits=self.activation_bits, symmetric=True, granularity="token")
        self._kv = KVSpec(bits=self.kv_bits) if self.kv_bits is not None else None

    def quantized(self, model: nn.Module, mapping: Mapping) -> AbstractContextManager[None]:
        """The loss's quantizers (straight-through) on ``model``'s linear inputs and KV cache, while open."""
        return _quantized_inputs(model, mapping, self._activations, self._kv)

    def learn(self, model: nn.Module, mapping: Mapping, plans: Rotated, fixed: Rotated, samples: torch.Tensor,
              device: torch.device) -> None:
        """Train the rotations of ``plans`` ((plan, rotation) pairs) in place of their initial values; ``fixed``
        ones (the online Hadamards' weight side) are applied after them, untrained."""
        rotations = [rotation.to(device, torch.float64) for _, rotation in plans]
        constant = [rotation.to(device) for _, rotation in fixed]
        base = {name: model.get_parameter(name).detach().to(device)
                for plan, _ in plans + fixed for name, _ in plan}
        dtype = next(iter(base.values())).dtype
        windows = samples[:self.samples, :self.seq_len] if self.seq_len else samples[:self.samples]
        momenta = [torch.zeros_like(r) for r in rotations]
        self.losses = []
        with self.quantized(model, mapping), _frozen(model), _on(model, device):
            bar = tqdm(range(self.iterations), desc="spinquant", disable=not self.progress)
            for step in bar:
                start = step * self.batch_size % len(windows)
                batch = windows[start:start + self.batch_size].to(device)
                leaves = [r.clone().requires_grad_(True) for r in rotations]
                params = rotated_parameters(base, plans + fixed, [r.to(dtype) for r in leaves + constant])
                loss = functional_call(model, params, args=(), kwargs={"input_ids": batch, "labels": batch,
                                                                       "use_cache": False}).loss
                loss.backward()
                lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.iterations))
                with torch.no_grad():
                    for i, leaf in enumerate(leaves):
                        momenta[i] = self.momentum * momenta[i] + leaf.grad
                        rotations[i] = cayley_step(rotations[i], momenta[i], lr)
                self.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
        for i, (plan, _) in enumerate(plans):
            plans[i] = (plan, rotations[i])


@contextmanager
def _quantized_inputs(model: nn.Module, mapping: Mapping, activations: QuantSpec, kv: KVSpec | None
                      ) -> Iterator[None]:
    """Straight-through fake quantization of every block linear's input and of the KV cache, while open."""
    handles, hooks_with_kv = [], []
    quantize = StraightThrough(ActivationQuantizer(activations))
    for block in blocks_of(model, mapping):
        for name in mapping.linear_names:
            handles.append(block.get_submodule(name).register_forward_pre_hook(
                lambda module, args: (quantize(args[0]), *args[1:])))
        if kv is not None:
            attention = block.get_submodule(mapping.attention)
            hooks = attention_hooks(attention, mapping.kv_hook)
            hooks.key = hooks.value = StraightThrough(KVQuantizer(kv, head_dim_of(attention)))
            hooks_with_kv.append(hooks)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for hooks in hooks_with_kv:
            hooks.key = hooks.value = None


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No gradients for the model's own parameters (only the rotations are trained), restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The whole model on ``device`` while open, back where it was afterwards."""
    where = next(model.parameters()).device
    model.to(device)
    try:
        yield
    finally:
        model.to(where)
