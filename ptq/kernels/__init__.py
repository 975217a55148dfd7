"""Packed-integer linear kernels: Triton W4A16 / W8A8 on GPU, plain-torch references on any device.

``reference`` holds the layouts and the ground truth; ``triton_w4a16`` and ``triton_w8a8`` the fused kernels
(imported lazily through ``dispatch.kernel`` so that the torch path needs no Triton). See docs/kernels.md.
"""

from ptq.kernels.dispatch import BACKENDS, kernel, triton_runs_on

__all__ = ["BACKENDS", "kernel", "triton_runs_on"]
