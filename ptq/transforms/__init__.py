"""Calibration algorithms, one file each, and the registry that builds a method's steps from config.

A method is a list of steps run block by block (``ptq.calibrate``): rescalers first (SmoothQuant, AWQ), then one
quantizer (RTN, GPTQ). Each step is a dict: ``name`` plus the algorithm's options; ``weight`` and
``activations`` hold QuantSpec fields (``activations`` also ``observer`` for static ranges and ``clip_ratio``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ptq.calibrate import Transform
from ptq.spec import QuantSpec
from ptq.transforms.awq import AWQ
from ptq.transforms.gptq import GPTQ
from ptq.transforms.kv_cache import KVCache
from ptq.transforms.llm_int8 import LLMInt8
from ptq.transforms.mixed_precision import MixedPrecision
from ptq.transforms.rotation import Rotation
from ptq.transforms.rtn import RTN
from ptq.transforms.smoothquant import SmoothQuant

TRANSFORMS: dict[str, Callable[..., Transform]] = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant,
                                                   "llm_int8": LLMInt8, "mixed": MixedPrecision,
                                                   "rotation": Rotation, "kv_cache": KVCache}

OBSERVER_KEY = "name"
DEFAULT_SCALE_DTYPE = "float32"
DEFAULT_FORMAT = "int"


def _spec(fields: dict[str, Any], key: str) -> QuantSpec:
    allowed = {"bits", "symmetric", "granularity", "group_size", "scale_dtype", "format"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"{key}.{sorted(unknown)[0]}: unknown key; allowed are {', '.join(sorted(allowed))}")
    try:
        return QuantSpec(**fields)
    except ValueError as error:
        raise ValueError(f"{key}.{error}") from None


def build_step(step: dict[str, Any], observer: dict[str, Any], index: int,
               scale_dtype: str = DEFAULT_SCALE_DTYPE, weight_format: str = DEFAULT_FORMAT) -> Transform:
    """One transform from its config dict; the weight observer defaults to the run's ``observer`` group, the
    scales of weights and of static activations are stored in ``scale_dtype`` and the weights lie on the grid
    ``weight_format``, unless the step sets its own."""
    step = dict(step)
    name = step.pop("name", None)
    key = f"method.steps[{index}]"
    if name not in TRANSFORMS:
        raise ValueError(f"{key}.name={name!r}: allowed are {', '.join(TRANSFORMS)}")
    if "weight" in step:
        step["weight"] = _spec({"scale_dtype": scale_dtype, "format": weight_format, **step["weight"]},
                               f"{key}.weight")
    activations = step.pop("activations", None)
    if activations:
        activations = dict(activations)
        act_observer = activations.pop("observer", None)
        if "clip_ratio" in activations:
            step["act_clip_ratio"] = activations.pop("clip_ratio")
        if act_observer:  # static qparams are stored; per-token ones are computed at run time, in float32
            activations = {"scale_dtype": scale_dtype, **activations}
        step["activations"] = _spec(activations, f"{key}.activations")
        if act_observer:
            act_observer = dict(act_observer)
            step["act_observer"] = act_observer.pop(OBSERVER_KEY)
            step["act_observer_options"] = act_observer
    if "weight" in step and "observer" not in step:
        options = dict(observer)
        step["observer"] = options.pop(OBSERVER_KEY)
        step["observer_options"] = options
    try:
        return TRANSFORMS[name](**step)
    except TypeError as error:
        raise ValueError(f"{key} ({name}): {error}") from None


def build_steps(steps: list[dict[str, Any]], observer: dict[str, Any], scale_dtype: str = DEFAULT_SCALE_DTYPE,
                weight_format: str = DEFAULT_FORMAT) -> list[Transform]:
    """The method's transforms, in order (none for ``method=none``, which evaluates a checkpoint as loaded)."""
    built = [build_step(step, observer, i, scale_dtype, weight_format) for i, step in enumerate(steps)]
    rescalers = [getattr(step, "rescaler", False) for step in built]
    if any(later and not earlier for earlier, later in zip(rescalers, rescalers[1:], strict=False)):
        names = [step.name for step in built]
        raise ValueError(f"method.steps={names}: rescalers (awq, smoothquant) must come before quantizers "
                         "(rtn, gptq, ...), which would otherwise be rescaled after rounding")
    return built
