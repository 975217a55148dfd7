"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1. For a linear layer with weight W [out, in] and calibration inputs X
[tokens, in], GPTQ minimises the layer's output error (eq. 1)

    argmin_Ŵ ‖X Wᵀ − X Ŵᵀ‖²,   whose Hessian (per output row) is H = 2 Xᵀ X

by quantizing W one input column at a time and spreading each column's rounding error over the columns not yet
quantized with the Optimal Brain Surgeon update (eq. 2): δ = −(w_q − quant(w_q)) / [H⁻¹]_qq · (H⁻¹)_{:,q}.
The three steps of §3 map onto ``gptq_quantize``:

- Step 1, arbitrary order: every row uses the same column order (input order, or descending diag(H) with
  ``act_order``), so H⁻¹ is shared by all rows;
- Step 2, lazy batch updates: inside a block of ``block_size`` columns errors are propagated column by column;
  the columns after the block receive the whole block's errors in one matrix product;
- Step 3, Cholesky reformulation: the rows of H⁻¹ that the sequential elimination needs are the rows of the
  upper Cholesky factor U of H⁻¹ = Uᵀ U (computed once, after dampening H by λ·I).

Only tensors go in and out (no modules, no hooks): ``HessianAccumulator`` collects H from a layer's inputs,
``gptq_quantize`` turns (W, H) into integers, quantization parameters and the dequantized weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ptq import distributed
from ptq.affine import round_to_grid
from ptq.calibrate import BlockContext, main_input, replace_main_input
from ptq.nn import ActivationQuantizer
from ptq.observers import Observer, Qparams, build_observer
from ptq.spec import LinearScheme, QuantSpec
from ptq.transforms.base import QuantizedWeight, Quantizer, layer_log, swap_to_fake_quant

DAMP_RETRIES = 5


class HessianAccumulator:
    """Running H = 2/n Σ_t x_t x_tᵀ over the n tokens seen so far (the Hessian of eq. 1, averaged over tokens).

    Each batch of m tokens rescales the old mean by n / (n + m) and adds the batch's xᵀx (``gram``) scaled by
    2 / (n + m), so the sum never grows with n (the reference's ``add_batch``).
    """

    def __init__(self, features: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.features = features
        self._hessian = torch.zeros(features, features, dtype=dtype, device=device)
        self._tokens = 0
        self._reduced = False

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` of shape [..., features]; every leading index is one token."""
        if x.shape[-1] != self.features:
            raise ValueError(f"inputs have {x.shape[-1]} features, the accumulator expects {self.features}")
        if self._reduced:
            raise RuntimeError("inputs added after the Hessian was combined across ranks")
        x = x.detach().reshape(-1, self.features).to(self._hessian)
        m = x.shape[0]
        if m == 0:
            return
        n = self._tokens
        self._hessian.mul_(n / (n + m)).add_(gram(x), alpha=2.0 / (n + m))
        self._tokens = n + m

    def all_reduce(self) -> HessianAccumulator:
        """Combine the ranks' H into the H of all their tokens, Σ_r n_r H_r / Σ_r n_r (``ptq.distributed``), once;
        nothing in one process. Returns the accumulator."""
        if not self._reduced:
            combined, self._tokens = distributed.weighted_mean(self._hessian, self._tokens)
            self._hessian.copy_(combined)
            self._reduced = True
        return self

    @property
    def hessian(self) -> torch.Tensor:
        """The current H [features, features] (the accumulator's own tensor, not a copy)."""
        return self._hessian

    @property
    def tokens(self) -> int:
        """How many tokens (rows of the flattened inputs) have been added."""
        return self._tokens


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """xᵀx for x [tokens, features], from the blocks on and above its diagonal (mirrored below): 10 of the 16
    block products with four column blocks, about 30% faster than one matmul for the features of an LLM. The
    mirroring is done in place, block by block, so that no [features, features] temporary is made."""
    features = x.shape[1]
    if features < 64 * blocks:
        return x.T @ x
    step = -(-features // blocks)
    product = torch.empty(features, features, dtype=x.dtype, device=x.device)
    for start in range(0, features, step):
        product[start : start + step, start:] = x[:, start : start + step].T @ x[:, start:]
    for start in range(0, features, step):
        stop = start + step
        diagonal = product[start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        product[stop:, start:stop] = product[start:stop, stop:].T
    return product


@dataclass
class GPTQResult:
    """What GPTQ decided for one weight [out, in]; every tensor is in the weight's original column order.

    ``scale`` and ``zero`` hold one column per group: [out, n_groups] for group granularity, [out, 1] for
    channel, [1, 1] for tensor. ``g_idx[j]`` is the group of input column j, and the weight dequantizes as

        weight[:, j] = scale[:, g_idx[j]] * (q[:, j] − zero[:, g_idx[j]])

    i.e. ``weight == scale[:, g_idx] * (q - zero[:, g_idx])`` (g_idx is all zeros for channel and tensor).
    Without act_order, or with static groups, g_idx[j] = j // group_size (the layout of ``ptq.affine``). With
    act_order and dynamic groups, groups are consecutive columns in the processing order, so g_idx is not
    monotone and the scales must be gathered through g_idx.
    """

    weight: torch.Tensor  # dequantized Ŵ, float32 [out, in]
    scale: torch.Tensor  # float32 [out, n_groups] (or [out, 1], [1, 1])
    zero: torch.Tensor  # float32, same shape as scale (integer valued; 0 when symmetric)
    g_idx: torch.Tensor  # int64 [in]
    q: torch.Tensor  # integers in [qmin, qmax] as float32 (as ``ptq.affine.quantize``), [out, in]
    row_loss: torch.Tensor  # [out]: ½ Σ_j (w − quant(w))² / U_jj² along each row, the summed OBS error increments
    damp: float  # λ added to diag(H), after any retries

    @property
    def loss(self) -> float:
        """The GPTQ error of the whole weight: the sum of ``row_loss``."""
        return float(self.row_loss.sum())

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight, self.scale, self.zero, self.q, self.g_idx, self.loss)

    def split_rows(self, sizes: list[int]) -> list[GPTQResult]:
        """The results of weights stacked along their rows, one per weight of ``sizes`` rows each."""
        parts = [t.split(sizes) for t in (self.weight, self.scale, self.zero, self.q, self.row_loss)]
        return [GPTQResult(w, s, z, self.g_idx, q, loss, self.damp) for w, s, z, q, loss in zip(*parts, strict=True)]


def _on_one_cpu_thread(solve: Callable[..., GPTQResult]) -> Callable[..., GPTQResult]:
    """Run ``solve`` on one CPU thread when its weight is on the CPU, restoring the thread count after.

    The column loop is thousands of small ops on [rows, ≤ block_size] slices; split across OpenMP threads, each
    op waits at a thread barrier that costs more than its arithmetic, so one thread is faster.
    """
    @functools.wraps(solve)
    def wrapper(weight: torch.Tensor, *args: Any, **kwargs: Any) -> GPTQResult:
        threads = torch.get_num_threads()
        if weight.device.type != "cpu" or threads == 1:
            return solve(weight, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return solve(weight, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_on_one_cpu_thread
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    observer: str = "minmax",
    observer_options: dict | None = None,
    block_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` [out, in] column by column, compensating each column's error (Algorithm 1).

    Quantization parameters come from the ``observer`` (``ptq.observers``) applied to: the whole weight, once,
    for ``channel``/``tensor`` granularity; for ``group`` granularity, the slice of the next ``group_size``
    columns in processing order each time a column starts a group, taken from the weights as updated by every
    error compensation so far (a ragged last group is the shorter slice). The reference reads that slice from
    W without the in-block updates that are still pending; here they are applied first, so the result does not
    depend on ``block_size``. ``static_groups`` computes every group's parameters up front from the original
    weight in original column order (so act_order does not change the grouping).

    ``hessian`` is H = 2/n Xᵀ X of the layer's inputs (``HessianAccumulator``); it is not modified. Columns with
    diag(H) = 0 never see input: they get H_ii = 1 and weight 0. Dampening adds λ = damp_percent · mean(diag H)
    to the diagonal; if H + λI is still not positive definite, λ is multiplied by 10 up to ``DAMP_RETRIES`` times.
    Work runs on ``weight``'s device in float32 (float64 when ``weight`` or ``hessian`` is float64).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian must be [{columns}, {columns}] to match the weight, got {tuple(hessian.shape)}")
    if spec.granularity == "token":
        raise ValueError("granularity='token' is for activations; GPTQ quantizes weights: use tensor, channel or group")
    if block_size < 1:
        raise ValueError(f"block_size={block_size!r}: allowed is an integer >= 1")
    if damp_percent < 0:
        raise ValueError(f"damp_percent={damp_percent!r}: allowed is a number >= 0")

    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    W = weight.detach().to(dtype=dtype).clone()
    H = hessian.detach().to(device=W.device, dtype=dtype).clone()
    grouped = spec.granularity == "group"
    group_size = spec.group_size if grouped else columns
    # Parameters of one group (or of the whole weight) as slot shape [out, 1], or [1, 1] for tensor granularity.
    # (MX and NVFP4 specs fix their group size: a slice of one group under the group spec gives the same shape.)
    slice_spec = spec if spec.granularity == "tensor" or spec.grid.group_size else replace(spec, granularity="channel")

    tensor_absmax = weight.detach().abs().amax().float() if spec.grid.tensor_scale else None

    def observe(x: torch.Tensor) -> Qparams:
        obs = build_observer(observer, slice_spec, **(observer_options or {}))
        obs.tensor_absmax = tensor_absmax  # NVFP4: one tensor scale, from the original weight, for every group
        return obs(x)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # (scale, zero) of each group in group order; dynamic groups are appended as the loop reaches them.
    params: list[Qparams] = []
    if grouped and static_groups:
        params = [observe(W[:, g : g + group_size]) for g in range(0, columns, group_size)]
    elif not grouped:
        params = [observe(W)]

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(columns, device=W.device)
    if act_order:  # (in input order nothing moves: no copies of W and H, which a wide layer feels)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv, damp = damped_inverse_cholesky(H, damp_percent)

    Q = torch.zeros_like(W)  # dequantized weights, processing order
    Qint = torch.zeros_like(W)  # integers, processing order
    row_loss = torch.zeros(W.shape[0], dtype=dtype, device=W.device)
    group_of = torch.zeros(columns, dtype=torch.long, device=W.device)  # group of each processed column

    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(i2 - i1):
            col = i1 + i
            if not grouped:
                group = 0
            elif static_groups:
                group = int(perm[col]) // group_size
            else:
                group = col // group_size
                if col % group_size == 0:
                    stop = min(col + group_size, columns)
                    params.append(observe(_updated_columns(W, W1, Err1, Hinv, i1, i, stop)))
            scale, zero = params[group]  # [out, 1] or [1, 1]: ``ptq.affine.quantize`` for one column, inlined
            group_of[col] = group

            w = W1[:, i : i + 1]
            q = round_to_grid(w.float() / scale, zero, spec)
            wq = scale * (q - zero)
            Qint[:, col : col + 1], Q[:, col : col + 1] = q, wq
            err = (w - wq) / Hinv1[i, i]
            W1[:, i:].addmm_(err, Hinv1[i : i + 1, i:], alpha=-1)
            Err1[:, i : i + 1] = err

        row_loss += Err1.pow(2).sum(dim=1) / 2  # (w − quant(w))² / U_qq² / 2 per column
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    invperm = torch.argsort(perm) if act_order else slice(None)
    return GPTQResult(
        weight=Q[:, invperm].float(),
        scale=torch.cat([s for s, _ in params], dim=1),
        zero=torch.cat([z for _, z in params], dim=1),
        g_idx=group_of[invperm],
        q=Qint[:, invperm].float(),
        row_loss=row_loss,
        damp=damp,
    )


def _updated_columns(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i: int, stop: int
) -> torch.Tensor:
    """Columns [i1 + i, stop) with every error update so far, including the block's still-lazy ones.

    Columns inside the current block are already up to date in ``W1``; columns after it still lack the
    errors ``Err1[:, :i]`` of the block's first i columns, which are applied here without touching ``W``.
    """
    i2 = i1 + W1.shape[1]
    inside = W1[:, i : stop - i1]
    if stop <= i2:
        return inside
    pending = Err1[:, :i] @ Hinv[i1 : i1 + i, i2:stop]
    return torch.cat([inside, W[:, i2:stop] - pending], dim=1)


def damped_inverse_cholesky(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = Uᵀ U (§3, Step 3) and the λ used.

    λ starts at damp_percent · mean(diag H) (1 % in the paper) and is multiplied by 10 (or set to 1 % of the
    mean diagonal when it is 0) each time H + λI, or its inverse, fails a Cholesky factorization.
    """
    mean_diag = float(torch.diag(hessian).mean())
    damp = damp_percent * mean_diag
    tried = []
    diagonal = hessian.diagonal().clone()
    try:
        for _ in range(DAMP_RETRIES + 1):
            # H + λI in H's own storage (its diagonal is restored below): [in, in] tensors are large for wide
            # layers, so only one more is alive at a time (the factor, then the inverse, then its factor)
            hessian.diagonal().copy_(diagonal + damp)
            lower, info = torch.linalg.cholesky_ex(hessian)
            if info == 0:
                inverse = torch.cholesky_inverse(lower)
                del lower
                upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
                if info == 0 and bool(torch.isfinite(upper).all()):
                    return upper, damp
            tried.append(damp)
            damp = 10 * damp if damp > 0 else 0.01 * abs(mean_diag)
    finally:
        hessian.diagonal().copy_(diagonal)
    raise RuntimeError(
        f"GPTQ: the Hessian is not positive definite even after damping with λ in {tried}; "
        "check the calibration inputs for NaN/Inf, or raise damp_percent"
    )


@dataclass
class GPTQ(Quantizer):
    """The GPTQ step on the block-wise engine: accumulate each Linear's H from the block's calibration inputs,
    solve, swap in the quantized Linear.

    Linears that read the same tensor (q, k, v; gate, up) share one H and are solved as one weight with their
    rows stacked: GPTQ treats rows independently given H, so this is exact (except for ``tensor`` granularity,
    whose single scale spans the weight: those are solved one by one).

    ``true_sequential`` quantizes the linears stage by stage in the order the block computes them (q,k,v → o →
    gate,up → down), each stage's H taken from inputs that the already-quantized stages produced, as the
    reference implementation does. With ``one_pass`` (the default) this costs one forward pass of the block:
    all calibration inputs run as one batch, and each stage is solved by a hook the moment its input arrives,
    before the call proceeds with the quantized weight; that pass's output is the quantized block's output.
    It needs the memory of one forward pass over all calibration tokens; ``one_pass=false`` streams the
    batches instead (one pass per stage plus one for the outputs).
    """

    name: str = "gptq"
    block_size: int = 128
    damp_percent: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    one_pass: bool = True
    hessian_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise ValueError(f"hessian_dtype={self.hessian_dtype!r}: allowed are {', '.join(HESSIAN_DTYPES)}")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r}: allowed is a positive integer")
        if not 0.0 <= self.damp_percent < 1.0:
            raise ValueError(f"damp_percent={self.damp_percent!r}: allowed is 0 <= damp_percent < 1")

    @property
    def needs_data(self) -> bool:
        return True

    def schemes(self) -> list[LinearScheme]:
        act_order = self.act_order and not self.static_groups and self.weight.granularity == "group"
        return [replace(scheme, act_order=act_order) for scheme in super().schemes()]

    def linear_stages(self, ctx: BlockContext) -> list[list[str]]:
        if self.true_sequential:
            return [list(group.linears) for group in ctx.mapping.groups]
        return [ctx.mapping.linear_names]

    def observe(self, ctx: BlockContext, names: list[str]) -> dict[str, HessianAccumulator]:
        """One H per distinct input: linears of a mapping group (q, k, v; gate, up) read the same tensor."""
        return {name: hessian for members, hessian, _ in self._stream_stage(ctx, names) for name in members}

    def _stream_stage(self, ctx: BlockContext, names: list[str]
                      ) -> list[tuple[list[str], HessianAccumulator, Observer | None]]:
        """Per group of ``names`` sharing an input: its H and activation observer, fed by one streamed pass."""
        stage = [(members, self._accumulator(ctx.module(members[0]).in_features, ctx.device), self._act_observer())
                 for members in _sharing_input(ctx, names)]
        ctx.stream({members[0]: _feeding(hessian, observer) for members, hessian, observer in stage})
        return stage

    def apply(self, ctx: BlockContext) -> None:
        if self.true_sequential and self.one_pass:
            self._apply_in_one_pass(ctx)
            return
        for names in self.linear_stages(ctx):
            for members, hessian, observer in self._stream_stage(ctx, names):
                self._finish(ctx, members, hessian, observer)

    def _apply_in_one_pass(self, ctx: BlockContext) -> None:
        stages = [members for names in self.linear_stages(ctx) for members in _sharing_input(ctx, names)]
        pending = {name: members for members in stages for name in members}
        sizes = [x.shape[0] for x in ctx.inputs]

        def solve_on_arrival(name: str) -> Callable[[nn.Module, tuple, dict], tuple | None]:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
                members = pending[name]
                for member in members:
                    del pending[member]
                x = main_input(args, kwargs)
                hessian, observer = self._accumulator(x.shape[-1], ctx.device), self._act_observer()
                hessian.add(x)
                for batch in x.split(sizes) if observer is not None else ():
                    observer.update(batch)
                quantizer = self._finish(ctx, members, hessian, observer)
                module.weight.data = ctx.module(name).weight.data  # the call in flight runs the replaced module
                return None if quantizer is None else replace_main_input(args, kwargs, quantizer(x))

            return hook

        ctx.run_joined({name: solve_on_arrival(name) for name in pending})
        if pending:
            raise RuntimeError(f"GPTQ one_pass: {sorted(pending)} never ran in the block's forward pass; "
                               "set one_pass=false for this model")

    def _act_observer(self) -> Observer | None:
        if self.activations is None or self.act_observer is None:
            return None
        return build_observer(self.act_observer, self.activations, **self.act_observer_options)

    def _finish(self, ctx: BlockContext, members: list[str], hessian: HessianAccumulator,
                observer: Observer | None) -> ActivationQuantizer | None:
        """Solve ``members`` and give them their input quantizer (static from ``observer``, or dynamic)."""
        self.quantize_group(ctx, members, hessian)
        if self.activations is None:
            return None
        quantizer = self.input_quantizer(observer, ctx.device)
        for member in members:
            ctx.module(member).input_quantizer = quantizer
        return quantizer

    def quantize_group(self, ctx: BlockContext, names: list[str], inputs: HessianAccumulator) -> None:
        """Solve the linears ``names`` (all reading the inputs behind H) and swap in their quantized versions."""
        linears = [ctx.module(name) for name in names]
        weights = [linear.weight.data.float() for linear in linears]
        if len(names) > 1 and self.weight.granularity != "tensor":
            results = self._solve(torch.cat(weights), inputs).split_rows([w.shape[0] for w in weights])
        else:
            results = [self._solve(weight, inputs) for weight in weights]
        for name, linear, weight, result in zip(names, linears, weights, results, strict=True):
            quantized = result.quantized_weight()
            swap_to_fake_quant(ctx.block, name, linear, self.weight, quantized)
            ctx.logs[ctx.qualified(name)] = layer_log(self.weight, weight, quantized)

    def quantize_weight(self, name: str, weight: torch.Tensor, inputs: HessianAccumulator) -> QuantizedWeight:
        return self._solve(weight, inputs).quantized_weight()

    def _solve(self, weight: torch.Tensor, inputs: HessianAccumulator) -> GPTQResult:
        hessian = inputs.all_reduce().hessian

        def solve(rows: torch.Tensor) -> GPTQResult:
            return gptq_quantize(rows, hessian, self.weight, self.observer, self.observer_options, self.block_size,
                                 self.damp_percent, self.act_order, self.static_groups)

        if self.weight.granularity == "tensor":  # one scale spans every row: each rank solves the whole weight
            return solve(weight)
        return solve_spread(weight, solve)

    def _accumulator(self, features: int, device: torch.device) -> HessianAccumulator:
        return HessianAccumulator(features, HESSIAN_DTYPES[self.hessian_dtype], device)


def solve_spread(weight: torch.Tensor, solve: Callable[[torch.Tensor], GPTQResult]) -> GPTQResult:
    """``solve(weight)``, with the rows spread over the ranks of a data-parallel run (``ptq.distributed``).

    Given H, GPTQ treats each output row on its own (the column loop updates rows independently, and channel and
    group scales are per row), so rank r solves its contiguous share of the rows and every rank receives the
    others' (``gather_rows``): each solve costs 1/world_size of the work and all ranks hold the same result. In
    one process, or with fewer rows than ranks, ``solve(weight)``.
    """
    sizes = distributed.row_sizes(weight.shape[0])
    if distributed.world_size() == 1 or min(sizes) == 0:
        return solve(weight)
    part = solve(weight.split(sizes)[distributed.rank()])
    gathered = [distributed.gather_rows(t, sizes) for t in (part.weight, part.scale, part.zero, part.q, part.row_loss)]
    return GPTQResult(*gathered[:3], part.g_idx, gathered[3], gathered[4], part.damp)


def _feeding(hessian: HessianAccumulator, observer: Observer | None) -> Callable[[torch.Tensor], None]:
    """One callback that adds a batch of inputs to H and, when there is one, to the activation observer."""
    def feed(x: torch.Tensor) -> None:
        hessian.add(x)
        if observer is not None:
            observer.update(x)

    return feed


def _sharing_input(ctx: BlockContext, names: list[str]) -> list[list[str]]:
    """``names`` grouped by the tensor they read: the members of each mapping group, in block order."""
    return [members for group in ctx.mapping.groups if (members := [n for n in group.linears if n in names])]


HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
