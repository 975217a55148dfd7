"""Observers choose a quantization range: ``obs.update(x)`` any number of times, then ``obs.qparams()``.

- ``minmax``: the running min and max of every slot.
- ``moving_minmax``: an exponential moving average of each batch's min and max (for activations, as in
  TensorRT / PyTorch's MovingAverageMinMaxObserver).
- ``percentile``: clip at the p-th percentile of |x| (or the p-th / (100 − p)-th percentiles of x when
  asymmetric), averaged over batches.
- ``mse``: grid-search the clip ratio r that minimises ‖x − Q_r(x)‖ₚ per slot, as AWQ's clip search
  (Lin et al. 2023, §3.3), the GPTQ reference's ``mse`` option and llama.cpp's scale search do.

Observers know tensors and ``QuantSpec`` only; every one works for every granularity. In a data-parallel run
(``ptq.distributed``) an activation observer has seen one rank's tokens: ``all_reduce`` makes it the observer of
every rank's (min/max: the ranks' minimum and maximum; percentile: the batch-weighted mean of the ranks' clips).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ptq import distributed
from ptq.affine import qparams_from_range, round_to_grid, slots
from ptq.spec import QuantSpec

Qparams = tuple[torch.Tensor, torch.Tensor]


class Observer:
    """Base class: accumulates statistics of the tensors it sees and turns them into (scale, zero).

    ``tensor_absmax``: the range of the whole tensor, for grids whose slot scales sit under a per-tensor scale
    (NVFP4) when the observer sees only part of the tensor (GPTQ's groups); None: what the observer saw.
    """

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.tensor_absmax: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def qparams(self) -> Qparams:
        raise NotImplementedError

    def all_reduce(self) -> Observer:
        """Combine what the ranks of a data-parallel run observed (nothing in one process); returns the observer.
        An observer whose statistic does not combine refuses, naming what does."""
        if distributed.active():
            raise ValueError(f"activations.observer={_name(self)}: its statistic depends on the order of the batches "
                             "and does not combine across ranks; allowed with torchrun are minmax, percentile")
        return self

    def __call__(self, x: torch.Tensor) -> Qparams:
        """Observe ``x`` alone and return its qparams (the one-shot use for weights)."""
        self.update(x)
        return self.qparams()


class MinMaxObserver(Observer):
    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = slots(x.detach().float(), self.spec)
        return view.amin(dim=-1), view.amax(dim=-1)

    def update(self, x: torch.Tensor) -> None:
        low, high = self._batch_range(x)
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)

    def qparams(self) -> Qparams:
        if self.low is None:
            raise RuntimeError("observer has seen no data")
        return qparams_from_range(self.low, self.high, self.spec, self.tensor_absmax)

    def all_reduce(self) -> Observer:
        if self.low is None:
            raise RuntimeError("observer has seen no data")
        distributed.all_reduce_min(self.low)
        distributed.all_reduce_max(self.high)
        return self


class MovingMinMaxObserver(MinMaxObserver):
    def __init__(self, spec: QuantSpec, momentum: float = 0.9) -> None:
        super().__init__(spec)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}: allowed is 0 <= momentum < 1")
        self.momentum = momentum

    all_reduce = Observer.all_reduce  # an average over the order of batches: refused across ranks

    def update(self, x: torch.Tensor) -> None:
        low, high = self._batch_range(x)
        if self.low is None:
            self.low, self.high = low, high
        else:
            m = self.momentum
            self.low, self.high = m * self.low + (1 - m) * low, m * self.high + (1 - m) * high


class PercentileObserver(MinMaxObserver):
    def __init__(self, spec: QuantSpec, percentile: float = 99.99) -> None:
        super().__init__(spec)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile!r}: allowed is 0 < percentile <= 100")
        self.percentile = percentile
        self.batches = 0

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = slots(x.detach().float(), self.spec)
        q = self.percentile / 100.0
        if self.spec.symmetric:
            high = _quantile(view.abs(), q)
            return -high, high
        return _quantile(view, 1.0 - q), _quantile(view, q)

    def update(self, x: torch.Tensor) -> None:
        low, high = self._batch_range(x)
        if self.low is None:
            self.low, self.high = low, high
        else:
            n = self.batches
            self.low, self.high = (self.low * n + low) / (n + 1), (self.high * n + high) / (n + 1)
        self.batches += 1

    def all_reduce(self) -> Observer:
        if self.low is None:
            raise RuntimeError("observer has seen no data")
        self.low, _ = distributed.weighted_mean(self.low, self.batches)
        self.high, self.batches = distributed.weighted_mean(self.high, self.batches)
        return self


def _quantile(view: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile over the last dim; large slots are subsampled deterministically (torch.quantile caps at 2^24)."""
    limit = 1 << 22
    if view.shape[-1] > limit:
        view = view[..., :: -(-view.shape[-1] // limit)]
    return torch.quantile(view, q, dim=-1)


class MSEObserver(Observer):
    """Range that minimises the p-norm of the quantization error per slot, searched over shrink ratios.

    For each r on a grid from 1 down to ``min_ratio`` the clipped range is [r·min, r·max]; the r with the lowest
    Σ|x − Q_r(x)|^p wins, independently per slot.
    """

    def __init__(self, spec: QuantSpec, grid: int = 50, min_ratio: float = 0.5, norm: float = 2.4) -> None:
        super().__init__(spec)
        if grid < 1:
            raise ValueError(f"grid={grid!r}: allowed is an integer >= 1")
        if not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"min_ratio={min_ratio!r}: allowed is 0 < min_ratio <= 1")
        self.grid, self.min_ratio, self.norm = grid, min_ratio, norm
        self.data: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.data.append(x.detach().float())

    def _observed(self) -> torch.Tensor:
        if not self.data:
            raise RuntimeError("observer has seen no data")
        if len(self.data) == 1:
            return self.data[0]
        if self.spec.granularity != "tensor":
            raise ValueError("the mse observer accumulates several batches only for granularity=tensor")
        return torch.cat([d.flatten() for d in self.data]).unsqueeze(0)

    def qparams(self) -> Qparams:
        x = self._observed()
        view = slots(x, self.spec)
        mask = slots(torch.ones_like(x), self.spec, pad=0.0)
        low, high = view.amin(dim=-1), view.amax(dim=-1)
        best_err = torch.full_like(low, float("inf"))
        tensor_absmax = torch.maximum(high, -low).amax() if self.tensor_absmax is None else self.tensor_absmax
        best_scale, best_zero = qparams_from_range(low, high, self.spec, tensor_absmax)
        for ratio in torch.linspace(1.0, self.min_ratio, self.grid).tolist():
            scale, zero = qparams_from_range(low * ratio, high * ratio, self.spec, tensor_absmax)
            err = slot_error(view, scale, zero, self.spec, self.norm, mask)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        return best_scale, best_zero


def slot_error(view: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, norm: float,
               mask: torch.Tensor) -> torch.Tensor:
    """Σ |x − Q(x)|^norm over the elements of each slot of ``view`` [..., S, L] (padding masked out)."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = round_to_grid(view / s, z, spec)
    err = (s * (q - z) - view).abs()
    err = err.square() if norm == 2 else err.pow(norm)
    return (err * mask).sum(dim=-1)


OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "moving_minmax": MovingMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def _name(observer: Observer) -> str:
    return next((name for name, cls in OBSERVERS.items() if type(observer) is cls), type(observer).__name__)


def build_observer(name: str, spec: QuantSpec, **options: float) -> Observer:
    """An observer from the registry, e.g. ``build_observer("mse", spec, grid=50)``."""
    if name not in OBSERVERS:
        raise ValueError(f"observer={name!r}: allowed are {', '.join(OBSERVERS)}")
    return OBSERVERS[name](spec, **options)
