"""Which implementation runs a packed op on a backend: a registry, resolved lazily.

Ops: ``weight_only`` (W4A16 / W8A16: int4-packed or int8 weights, float activations) and ``w8a8`` (dynamic
per-token int8 activations × per-channel int8 weights). Backends: ``torch`` (the plain-torch reference: any
device, the CPU path) and ``triton`` (the fused kernels: CUDA tensors, or any tensors under
``TRITON_INTERPRET=1``). Triton modules are imported on first use, so the torch backend works without Triton.
int8 weight-only layers have no Triton kernel: on the triton backend they run the reference (dequantize on the
GPU, then cuBLAS).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

BACKENDS: tuple[str, ...] = ("torch", "triton")

KERNELS: dict[tuple[str, str], tuple[str, str]] = {
    ("weight_only", "torch"): ("ptq.kernels.reference", "weight_only_linear"),
    ("w8a8", "torch"): ("ptq.kernels.reference", "w8a8_linear"),
    ("weight_only", "triton"): ("ptq.kernels.triton_w4a16", "w4a16_linear"),
    ("w8a8", "triton"): ("ptq.kernels.triton_w8a8", "w8a8_linear"),
}


def check_backend(backend: str) -> None:
    """Raise a one-line error for an unknown backend name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed are {', '.join(BACKENDS)}")


def interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` is set: ``triton.jit`` then makes interpreted (numpy, CPU) functions."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_runs_on(x: torch.Tensor) -> bool:
    """Triton kernels take CUDA tensors, or CPU tensors when the interpreter is on."""
    return x.is_cuda or interpreter_on()


def kernel(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """The function that runs ``op`` on ``backend`` (see ``KERNELS`` for the signatures' modules)."""
    check_backend(backend)
    if (op, backend) not in KERNELS:
        raise ValueError(f"op={op!r}: allowed are {', '.join(sorted({o for o, _ in KERNELS}))}")
    module, name = KERNELS[op, backend]
    return getattr(importlib.import_module(module), name)
