"""Rotations (QuaRot / SpinQuant R1–R4): Hadamard matrices are orthogonal at every size claimed, the rotated fp model
computes the same function on every rotatable family, families that cannot be rotated fail in one line, and the
rotation lowers the W4A4 error of RTN and GPTQ through ptq.calibrate."""

from __future__ import annotations

import copy

import pytest
import torch
from test_families import family_model, logits, relative_error, samples
from torch import nn

from ptq.calibrate import calibrate
from ptq.hadamard import ROTATIONS, OnlineHadamard, hadamard, hadamard_core, has_hadamard
from ptq.kv_cache import HOOKS
from ptq.models.mappings import blocks_of, fold_of, mapping_for
from ptq.nn import FakeQuantLinear, set_submodule
from ptq.pipeline import run
from ptq.spec import QuantSpec
from ptq.transforms.gptq import GPTQ
from ptq.transforms.kv_cache import KVCache
from ptq.transforms.rotation import Rotation, rotatable_families
from ptq.transforms.rtn import RTN
from ptq.transforms.spinquant import cayley_step

ROTATABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
NOT_ROTATABLE = ["opt", "gpt2", "falcon-7b", "gemma2", "gemma3"]
NO_HADAMARD_BELOW_200 = {52, 92, 100, 116, 156, 172, 184, 188}  # as ptq.hadamard's docstring states


def test_hadamard_cores_are_orthogonal_for_every_order_claimed():
    orders = [1, 2, *range(4, 201, 4)]
    assert {k for k in orders if not has_hadamard(k)} == NO_HADAMARD_BELOW_200
    for k in (12, 20, 28, 36, 44, 60, 68, 76, 84, 104, 108, 124, 140, 148):  # Paley I and II cores
        assert hadamard_core(k) is not None, k
    for k in orders:
        if has_hadamard(k):
            h = hadamard(k)
            assert set(h.unique().tolist()) <= {-1.0, 1.0}
            assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)), k


@pytest.mark.parametrize("n", [*(64 * k for k in range(1, 25)), 96, 160, 960])
def test_hadamard_is_orthogonal_at_hidden_sizes(n):
    h = hadamard(n).float()  # ±1 entries, integer sums below 2^24: exact in float32
    assert torch.equal(h @ h.T, n * torch.eye(n))


@pytest.mark.parametrize("kind", list(ROTATIONS))
@pytest.mark.parametrize("n", [192, 208])  # 192 = 12·16 (Paley I); 208 = 52·4 has none here: random orthogonal
def test_rotations_are_orthogonal_and_seeded(kind, n):
    if kind == "hadamard" and not has_hadamard(n):
        with pytest.raises(ValueError, match="no Hadamard construction"):
            ROTATIONS[kind](n, torch.Generator().manual_seed(0))
        return
    q = ROTATIONS[kind](n, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, ROTATIONS[kind](n, torch.Generator().manual_seed(0)))
    if kind != "hadamard":
        assert not torch.equal(q, ROTATIONS[kind](n, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("n", [96, 576, 1536, 208])
def test_online_hadamard_multiplies_by_its_orthogonal_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    online = OnlineHadamard(n)
    matrix = online.matrix()
    assert torch.allclose(matrix @ matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(online(x), x @ matrix, atol=1e-12)
    assert online(x.float()).dtype == torch.float32


class ExactRMSNorm(nn.Module):
    """RMSNorm in the input's dtype (transformers' RMSNorms compute in float32, which caps float64 agreement at
    ~1e-7): x / rms(x) · w, or · (1 + w) for Gemma's."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        self.offset = 1.0 if fold_of(norm) == "norm_plus_one" else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.offset + self.weight)


def exact_norms(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            set_submodule(model, name, ExactRMSNorm(module))
    return model


def rotated(model: nn.Module, x: torch.Tensor, **options) -> nn.Module:
    model = copy.deepcopy(model)
    Rotation(**options).prepare(model, mapping_for(model), x, 4, "cpu")
    return model


@pytest.mark.parametrize("name", ROTATABLE)
def test_rotated_model_computes_the_same_function(name):
    x = samples()
    model = family_model(name)
    reference = logits(model, x)
    rotated32 = rotated(model, x, attention_output_hadamard=True)
    assert relative_error(logits(rotated32, x), reference) <= 1e-4

    mapping = mapping_for(rotated32)
    block = blocks_of(rotated32, mapping)[0]
    norm = block.input_layernorm  # folded into q, k, v: its scale is now 1 (w = 1, or Gemma's w = 0)
    assert torch.equal(norm.weight, torch.full_like(norm.weight, 1.0 if fold_of(norm) == "norm" else 0.0))
    assert block.mlp.down_proj.input_transform is not None  # R4, kept by the model
    assert getattr(block.get_submodule(mapping.attention), HOOKS).rotation is not None  # R3
    assert rotated32.lm_head.weight is not rotated32.get_input_embeddings().weight
    assert not torch.allclose(rotated32.get_input_embeddings().weight, model.get_input_embeddings().weight)

    model64 = exact_norms(family_model(name)).double()
    assert relative_error(logits(rotated(model64, x, attention_output_hadamard=True), x), logits(model64, x)) <= 1e-9


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("alone", ["r1", "r2", "r3", "r4", "attention_output_hadamard"])
def test_each_rotation_alone_leaves_the_function_unchanged(name, alone):
    x = samples()
    model = exact_norms(family_model(name)).double()
    only = {key: key == alone for key in ("r1", "r2", "r3", "r4", "attention_output_hadamard")}
    assert relative_error(logits(rotated(model, x, **only), x), logits(model, x)) <= 1e-9


@pytest.mark.parametrize("name", NOT_ROTATABLE)
def test_families_that_cannot_be_rotated_fail_in_one_line(name):
    model = family_model(name)
    with pytest.raises(ValueError) as error:
        Rotation().prepare(model, mapping_for(model), samples(), 4, "cpu")
    message = str(error.value)
    assert "\n" not in message and "rotation: model_type=" in message
    assert "allowed are " + ", ".join(rotatable_families()) in message
    assert set(rotatable_families()) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}
    with torch.device("meta"):  # before any weight loads: the check needs the skeleton only
        skeleton = type(model)(model.config)
    with pytest.raises(ValueError, match="rotation: model_type="):
        Rotation().check_model(skeleton, mapping_for(skeleton))


def test_rotation_options_fail_in_one_line():
    with pytest.raises(ValueError, match="kind='qr': allowed are hadamard, random_hadamard, random_orthogonal"):
        Rotation(kind="qr")
    with pytest.raises(ValueError, match="at least one rotation"):
        Rotation(r1=False, r2=False, r3=False, r4=False, attention_output_hadamard=False)
    with pytest.raises(RuntimeError, match="call prepare"):
        calibrate(family_model("llama"), mapping_for(family_model("llama")), samples(), [Rotation()], progress=False)


W4 = QuantSpec(bits=4, symmetric=True, granularity="channel")
A4 = QuantSpec(bits=4, symmetric=True, granularity="token")
KV4 = {"bits": 4, "symmetric": False, "granularity": "head"}


def w4a4kv4_error(model: nn.Module, quantizer: str, rotate: bool) -> float:
    x = samples(8, 32)
    reference = logits(model, x)
    model = copy.deepcopy(model)
    mapping = mapping_for(model)
    steps = [Rotation()] if rotate else []
    steps += [KVCache(key=KV4, value=KV4), {"rtn": RTN, "gptq": GPTQ}[quantizer](weight=W4, activations=A4)]
    if rotate:
        steps[0].prepare(model, mapping, x, 4, "cpu")
    calibrate(model, mapping, x, steps, progress=False)
    assert isinstance(blocks_of(model, mapping)[0].mlp.down_proj, FakeQuantLinear)
    return relative_error(logits(model, x), reference)


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_rotation_lowers_the_w4a4kv4_error(quantizer):
    model = family_model("llama")  # norms with 10x outlier channels: outlier activations
    plain, rotated_error = w4a4kv4_error(model, quantizer, False), w4a4kv4_error(model, quantizer, True)
    assert rotated_error < 0.8 * plain, (plain, rotated_error)


def test_rotated_down_proj_input_is_what_gptq_and_the_quantizer_see():
    """The online Hadamard runs before every hook: a quantized down_proj still computes the rotated product."""
    x = samples()
    model = rotated(family_model("llama"), x)
    mapping = mapping_for(model)
    calibrate(model, mapping, x, [GPTQ(weight=QuantSpec(bits=8, granularity="channel"))], progress=False)
    down = blocks_of(model, mapping)[0].mlp.down_proj
    assert isinstance(down, FakeQuantLinear) and isinstance(down.input_transform, OnlineHadamard)
    assert relative_error(logits(model, x), logits(family_model("llama"), x)) < 0.05


def test_cayley_sgd_stays_orthogonal_and_finds_the_rotation():
    """min ‖X R − X R*‖² over rotations: Cayley SGD (SpinQuant §3.2) converges to R* and never leaves SO(n)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64, generator=generator)
    target = ROTATIONS["random_orthogonal"](8, generator)
    target[:, 0] *= torch.linalg.det(target).sign()  # reachable from the identity: det +1
    r, momentum = torch.eye(8, dtype=torch.float64), torch.zeros(8, 8, dtype=torch.float64)
    losses = []
    for _ in range(300):
        leaf = r.clone().requires_grad_(True)
        loss = (x @ leaf - x @ target).pow(2).sum()
        loss.backward()
        momentum = 0.9 * momentum + leaf.grad
        r = cayley_step(r, momentum, lr=0.002)
        losses.append(loss.item())
        assert torch.allclose(r @ r.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert losses[-1] < 1e-6 * losses[0]


def test_learned_rotations_keep_the_function_and_their_loss_history():
    x = samples()
    model = family_model("llama")
    step = Rotation(learn={"iterations": 3, "samples": 2, "seq_len": 8, "progress": False})
    learned = copy.deepcopy(model)
    step.prepare(learned, mapping_for(learned), x, 4, "cpu")
    assert len(step._learner.losses) == 3 and all(loss > 0 for loss in step._learner.losses)
    assert relative_error(logits(learned, x), logits(model, x)) <= 1e-4
    assert not torch.allclose(logits(learned, x), logits(rotated(model, x), x), atol=1e-7)  # R1, R2 moved
    assert step.applied["r1"] == "random_hadamard learned 64"
    with pytest.raises(ValueError, match=r"learn.iterations=0: allowed is a positive integer"):
        Rotation(learn={"iterations": 0})
    with pytest.raises(ValueError, match="learn: .*unexpected keyword argument 'steps'"):
        Rotation(learn={"steps": 3})


def test_a_spinquant_run_reports_its_learning_cost_and_loss_curve(tiny_config, tmp_path, capsys):
    results = run(tiny_config("method=spinquant_gptq", "method.steps.0.learn.iterations=4",
                              "method.steps.0.learn.samples=2", "method.steps.0.learn.seq_len=8",
                              "method.steps.0.learn.progress=false", "eval.baseline=false"), tmp_path)
    learned = results["learning"]["rotation"]
    assert learned["iterations"] == 4 == len(learned["losses"]) and learned["seconds"] > 0
    assert learned["last_loss"] == learned["losses"][-1] and (tmp_path / "rotation_loss.png").stat().st_size > 0
    assert "rotation learned: 4 iterations, loss" in capsys.readouterr().out
    assert Rotation().learning() is None  # fixed rotations learn nothing
