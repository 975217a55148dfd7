"""Diagnostics of a quantized model (``diagnostics=true``): per-layer output errors, activation outliers, plots.

Per Linear, added to the per-layer table (``results.json`` "layers", the W&B "layers" table) beside the weight
error every quantizer logs (``weight_mse``, ``weight_sqnr_db``):

- ``output_mse``, ``output_sqnr_db``: the quantized layer's output ŷ = module(x) against y = x Wᵀ + b of the
  full-precision weight it replaced, on the inputs the layer receives during calibration (its first
  ``DIAGNOSTIC_BATCHES`` batches): mean (ŷ − y)² and 10 log₁₀(Σ y² / Σ (ŷ − y)²). Activation quantization and
  LLM.int8()'s decomposition are included; upstream error is not (both see the same x);
- ``act_outlier_ratio``: max_j m_j / median_j m_j with m_j = max_t |x_tj| over every calibration token. The
  outlier features of LLM.int8() (Dettmers et al. 2022, §4) and SmoothQuant (Xiao et al. 2022, §3, Fig. 4) show
  as ratios ≫ 1; ``act_kurtosis`` = E[(x − μ)⁴] / σ⁴ over all elements (3 for a Gaussian);
- ``act_outlier_ratio_rescaled``: the same after the method's rescalers (SmoothQuant, AWQ), when it has any.

The numbers are collected by probe steps that the block engine runs like any transform (``Diagnostics.wrap``): one
before the method's steps (raw input statistics), one after its rescalers (rescaled statistics and a copy of the
full-precision weights the quantizer will replace), one after its quantizers (output errors). A run without
diagnostics runs none of them. ``write_plots`` draws three PNG figures into the run directory: per-layer weight and
output SQNR by block and layer role, the input-channel magnitudes of the layer with the strongest outliers among
those the rescalers changed (before and after them), and the histogram of one weight beside its dequantized
histogram (the layer with the lowest weight SQNR).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ptq.calibrate import BlockContext, Transform, main_input
from ptq.transforms.base import Quantizer

DIAGNOSTIC_BATCHES = 2
HISTOGRAM_SAMPLES = 1 << 20  # a larger weight is subsampled (every k-th element) for its histogram
RESCALED_RTOL = 1e-3  # channel maxima within this of the raw ones: the rescalers left that input alone


def sqnr_db(signal: float, noise: float) -> float:
    """10 log₁₀(signal / noise) in dB; inf for an exact result."""
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf


def outlier_ratio(channel_absmax: torch.Tensor | np.ndarray) -> float:
    """max_j m_j / median_j m_j of per-channel magnitudes m (1 when all channels are alike)."""
    values = np.asarray(channel_absmax, dtype=float)
    median = float(np.median(values))
    return float(values.max()) / median if median > 0 else math.inf


def kurtosis(n: float, s1: float, s2: float, s3: float, s4: float) -> float:
    """E[(x − μ)⁴] / σ⁴ from the raw power sums s_k = Σ x^k of n elements."""
    mu = s1 / n
    var = s2 / n - mu**2
    m4 = s4 / n - 4 * mu * s3 / n + 6 * mu**2 * s2 / n - 3 * mu**4
    return m4 / var**2 if var > 0 else math.nan


class InputStats:
    """Per-channel max |x| and the power sums Σ x, Σ x², Σ x³, Σ x⁴ of every element seen."""

    def __init__(self) -> None:
        self.channel_absmax: torch.Tensor | None = None
        self.sums = torch.zeros(5, dtype=torch.float64)  # n, Σx, Σx², Σx³, Σx⁴

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        absmax = x.abs().amax(dim=0).float().cpu()
        self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)
        x = x.double()
        x2 = x * x
        self.sums += torch.stack([x.new_tensor(x.numel()), x.sum(), x2.sum(), (x2 * x).sum(), (x2 * x2).sum()]).cpu()

    def outlier_ratio(self) -> float:
        return outlier_ratio(self.channel_absmax)

    def kurtosis(self) -> float:
        return kurtosis(*self.sums.tolist())


@dataclass
class WeightSample:
    """One layer's weights, full precision and dequantized, for the histogram figure."""

    layer: str
    weight: np.ndarray
    dequantized: np.ndarray
    sqnr_db: float


@dataclass
class Probe:
    """A diagnostics step: runs ``run`` on each block at its place in the method."""

    run: Callable[[BlockContext], None]
    name: str = "diagnostics"
    needs_data: ClassVar[bool] = True

    def apply(self, ctx: BlockContext) -> None:
        self.run(ctx)


class Diagnostics:
    """Collects the per-layer diagnostics of one calibration run; ``wrap`` the method's steps with its probes."""

    def __init__(self, batches: int = DIAGNOSTIC_BATCHES) -> None:
        self.batches = batches
        self.raw: dict[str, InputStats] = {}
        self.rescaled: dict[str, InputStats] = {}
        self.rescalers: list[str] = []
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # fp weights of the current block
        self.sample: WeightSample | None = None

    def wrap(self, steps: list[Transform]) -> list[Transform]:
        """[raw probe, rescalers…, rescaled probe (if any rescaler), quantizers…, error probe]."""
        first = next((i for i, step in enumerate(steps) if isinstance(step, Quantizer)), len(steps))
        rescalers, quantizers = steps[:first], steps[first:]
        self.rescalers = [step.name for step in rescalers]
        if not rescalers:
            return [Probe(self._observe_raw), *quantizers, Probe(self._measure)]
        return [Probe(self._observe_raw), *rescalers, Probe(self._observe_rescaled), *quantizers, Probe(self._measure)]

    def _observe_raw(self, ctx: BlockContext) -> None:
        self._observe(ctx, self.raw, snapshot=not self.rescalers)

    def _observe_rescaled(self, ctx: BlockContext) -> None:
        self._observe(ctx, self.rescaled, snapshot=True)

    def _observe(self, ctx: BlockContext, store: dict[str, InputStats], snapshot: bool) -> None:
        """Input statistics of every Linear (once per group: a group's linears read the same input)."""
        stats = {group.linears[0]: InputStats() for group in ctx.mapping.groups}
        ctx.stream({name: stat.update for name, stat in stats.items()})
        for group in ctx.mapping.groups:
            for name in group.linears:
                store[ctx.qualified(name)] = stats[group.linears[0]]
        if snapshot:
            for name in ctx.mapping.linear_names:
                linear = ctx.module(name)
                bias = None if linear.bias is None else linear.bias.data.float().clone()
                self.reference[name] = (linear.weight.data.float().clone(), bias)

    @torch.no_grad()
    def _measure(self, ctx: BlockContext) -> None:
        names = ctx.mapping.linear_names
        few = replace(ctx, inputs=ctx.inputs[: self.batches], kwargs=ctx.kwargs[: self.batches], logs={})
        seen = few.capture(names)
        for name in names:
            qualified, module = ctx.qualified(name), ctx.module(name)
            weight, bias = self.reference.pop(name)
            signal = noise = count = 0.0
            for args, kwargs in seen[name]:
                x = main_input(args, kwargs)
                reference = F.linear(x.float(), weight, bias)
                error = module(x).float() - reference
                signal += float(reference.pow(2).sum())
                noise += float(error.pow(2).sum())
                count += reference.numel()
            row = ctx.logs.setdefault(qualified, {})
            raw = self.raw[qualified]
            row.update(output_mse=noise / count if count else math.nan, output_sqnr_db=sqnr_db(signal, noise),
                       act_outlier_ratio=raw.outlier_ratio(), act_kurtosis=raw.kurtosis())
            if self.rescalers:
                row["act_outlier_ratio_rescaled"] = self.rescaled[qualified].outlier_ratio()
            self._keep_sample(qualified, weight, module.weight.data, row.get("weight_sqnr_db", math.inf))

    def _keep_sample(self, layer: str, weight: torch.Tensor, dequantized: torch.Tensor, sqnr: float) -> None:
        """Keep the weights of the layer with the lowest weight SQNR so far."""
        if self.sample is not None and sqnr >= self.sample.sqnr_db:
            return
        step = max(1, -(-weight.numel() // HISTOGRAM_SAMPLES))
        self.sample = WeightSample(layer, weight.flatten()[::step].cpu().numpy(),
                                   dequantized.float().flatten()[::step].cpu().numpy(), sqnr)

    def channel_plot_layer(self) -> str:
        """The layer whose input channels are drawn: the strongest outliers (max / median of the channels' max |x|)
        among the inputs the rescalers changed, so that before and after differ (SmoothQuant leaves Llama's
        down_proj, often the most outlier-heavy input, alone); among all inputs if there is no rescaler or it
        changed none."""
        candidates = list(self.raw)
        if self.rescalers:
            candidates = [name for name in candidates if not torch.allclose(
                self.raw[name].channel_absmax, self.rescaled[name].channel_absmax, rtol=RESCALED_RTOL)] or candidates
        return max(candidates, key=lambda name: self.raw[name].outlier_ratio())

    def write_plots(self, layers: dict[str, dict[str, Any]], directory: Path) -> dict[str, Path]:
        """The three figures as PNG files in ``directory``; returns {W&B key: path}."""
        directory = Path(directory)
        images: dict[str, Path] = {}
        if layers:
            images["diagnostics/layer_sqnr"] = plot_layer_sqnr(
                short_names(list(layers)), [row.get("weight_sqnr_db", math.nan) for row in layers.values()],
                [row.get("output_sqnr_db", math.nan) for row in layers.values()], directory / "layer_sqnr.png")
        if self.raw:
            layer = self.channel_plot_layer()
            after = self.rescaled[layer].channel_absmax.numpy() if self.rescalers else None
            images["diagnostics/activation_channels"] = plot_channel_magnitudes(
                self.raw[layer].channel_absmax.numpy(), after, layer, "+".join(self.rescalers),
                directory / "activation_channels.png")
        if self.sample is not None:
            row = layers.get(self.sample.layer, {})
            group = row.get("group_size")
            label = f"int{row.get('bits', '?')} dequantized, " + (f"groups of {group}" if isinstance(group, int)
                                                                   else f"per {group}")
            images["diagnostics/weight_histogram"] = plot_weight_histogram(
                self.sample.weight, self.sample.dequantized, self.sample.layer, label,
                directory / "weight_histogram.png")
        return images


def short_names(names: list[str]) -> list[str]:
    """Layer names without the prefix they all share ("model.layers.3.mlp.up_proj" → "3.mlp.up_proj")."""
    if len(names) < 2:
        return names
    prefix = ""
    for parts in zip(*(name.split(".") for name in names), strict=False):
        if len(set(parts)) > 1:
            break
        prefix += parts[0] + "."
    return [name[len(prefix):] or name for name in names]


def _finite(values: list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return np.where(np.isfinite(array), array, np.nan)


def block_and_role(name: str) -> tuple[int, str] | None:
    """(3, "mlp.up_proj") for "model.layers.3.mlp.up_proj": the last integer path component and what follows it."""
    parts = name.split(".")
    index = next((i for i in range(len(parts) - 2, -1, -1) if parts[i].isdigit()), None)
    return None if index is None else (int(parts[index]), ".".join(parts[index + 1 :]))


def plot_layer_sqnr(names: list[str], weight_db: list[float], output_db: list[float], path: Path) -> Path:
    """Weight SQNR (top) and output SQNR (bottom) of every layer, in dB.

    For a model of repeated blocks, one line per layer role (q_proj, …, down_proj) over the block index, so a
    30-block model stays one readable figure; otherwise one bar per layer. Exact layers (infinite SQNR) are blank.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    panels = ((axes[0], weight_db, "weight: 10 log10(‖W‖² / ‖W − Ŵ‖²)"),
              (axes[1], output_db, "layer output on calibration inputs: 10 log10(‖y‖² / ‖ŷ − y‖²)"))
    parsed = [block_and_role(name) for name in names]
    if all(parsed) and len({block for block, _ in parsed}) > 1:
        roles = list(dict.fromkeys(role for _, role in parsed))
        for ax, values, title in panels:
            for role in roles:
                points = [(block, v) for (block, r), v in zip(parsed, _finite(values), strict=True) if r == role]
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, lw=1, label=role)
            ax.set_title(title, fontsize=10)
        axes[1].set_xlabel("decoder block")
        axes[0].legend(fontsize=8, ncols=min(len(roles), 4), loc="best")
    else:
        positions = np.arange(len(names))
        for ax, values, title in panels:
            ax.bar(positions, _finite(values))
            ax.set_title(title, fontsize=10)
        axes[1].set_xticks(positions, names, rotation=90, fontsize=7)
    for ax, _, _ in panels:
        ax.set_ylabel("SQNR (dB, higher is better)")
        ax.grid(alpha=0.3)
    fig.suptitle("Quantization error per layer")
    fig.savefig(path, dpi=100)
    return path


def plot_channel_magnitudes(before: np.ndarray, after: np.ndarray | None, layer: str, rescaler: str,
                            path: Path) -> Path:
    """max |x| of every input channel of one layer, before and (if given) after a rescaler such as SmoothQuant.

    Log scale; channels that never fire (max |x| = 0, e.g. dead ReLUs) are left out.
    """
    from matplotlib.figure import Figure

    def positive(values: np.ndarray) -> np.ndarray:
        return np.where(values > 0, values, np.nan)

    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    channels = np.arange(len(before))
    ratio = f"max / median {outlier_ratio(before):.1f}"
    label = f"before {rescaler} ({ratio})" if after is not None else f"calibration inputs ({ratio})"
    ax.plot(channels, positive(before), ".", ms=3, label=label)
    if after is not None:
        ax.plot(channels, positive(after), ".", ms=3,
                label=f"after {rescaler} (max / median {outlier_ratio(after):.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("input channel j")
    ax.set_ylabel("max_t |x_tj| over calibration tokens")
    ax.set_title(f"Input channel magnitudes of {layer}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def plot_weight_histogram(weight: np.ndarray, dequantized: np.ndarray, layer: str, label: str, path: Path) -> Path:
    """Side by side, on the same bins: the full-precision weight values and their dequantized values."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True, sharey=True)
    bins = np.linspace(min(weight.min(), dequantized.min()), max(weight.max(), dequantized.max()), 121)
    left.hist(weight, bins=bins, color="steelblue")
    left.set_title("full precision")
    right.hist(dequantized, bins=bins, color="darkorange")
    right.set_title(label)
    for ax in (left, right):
        ax.set_xlabel("weight value")
        ax.set_yscale("log")  # the tails (what clipping and coarse grids change) stay visible
    left.set_ylabel("count (log scale)")
    fig.suptitle(f"Weight distribution of {layer}")
    fig.savefig(path, dpi=100)
    return path


def plot_learning_curve(losses: list[float], title: str, path: Path) -> Path:
    """The loss at every iteration of a step that learns (SpinQuant's rotations), on a linear scale."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(1, len(losses) + 1), losses, marker="o", ms=3, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss of the quantized network")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path
