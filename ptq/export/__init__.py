"""Writing a calibrated model to a checkpoint other tools load: one module per format behind ``EXPORTERS``.

- ``compressed_tensors``: the compressed-tensors format that transformers and vLLM load (``compressed_tensors.py``);
- ``gguf``: llama.cpp's GGUF with Q4_0 / Q4_1 / Q8_0 blocks (``gguf.py``);
- ``ptq``: ptq's own packed safetensors checkpoint, for every scheme ptq calibrates (``ptq_format.py``).

``export=none`` writes nothing. See ``ptq.export.base`` for the contract every exporter follows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ptq.export.base import ExportContext, Exporter, ExportError, ExportPlan, calibrated_linears, files_size
from ptq.export.compressed_tensors import CompressedTensorsExporter
from ptq.export.gguf import GGUFExporter
from ptq.export.ptq_format import PtqExporter

EXPORTERS: dict[str, Exporter] = {
    exporter.name: exporter for exporter in (CompressedTensorsExporter(), GGUFExporter(), PtqExporter())
}
EXPORT_NONE = "none"
HALF_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def exact_scale_dtype(export: str, model_dtype: Callable[[], torch.dtype]) -> str:
    """``scale_dtype=auto``: the scale format in which ``export`` stores the run's scales unchanged.

    GGUF blocks hold fp16 scales. compressed-tensors stores scales in the model's dtype, and a half-precision
    server (vLLM) casts them to it: the model's half dtype, else bfloat16 (exact in a float32 model too). ptq's own
    format, and no export, keep float32 (the results of runs before scales had a dtype).
    """
    if export == "gguf":
        return "float16"
    if export == "compressed_tensors":
        return HALF_DTYPES.get(model_dtype(), "bfloat16")
    return "float32"

__all__ = ["EXPORTERS", "EXPORT_NONE", "exact_scale_dtype", "ExportContext", "ExportError", "ExportPlan", "Exporter",
           "calibrated_linears", "files_size"]
