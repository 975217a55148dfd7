"""Data-parallel calibration (``ptq.distributed``): two gloo processes on the CPU decide the same quantized model as
one process, within float summation order, for RTN (static activation ranges), GPTQ, AWQ and SmoothQuant; a rank
that fails stops torchrun's whole group with its error; an end-to-end ``torchrun run.py`` matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ptq import distributed
from ptq.calibrate import calibrate
from ptq.models.mappings import mapping_for
from ptq.observers import build_observer
from ptq.spec import QuantSpec
from ptq.transforms import build_steps
from ptq.transforms.gptq import HessianAccumulator
from ptq.transforms.scaling import ChannelStat

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORLD = 2
W4 = {"bits": 4, "granularity": "group", "group_size": 32}
STATIC_A8 = {"bits": 8, "granularity": "tensor", "observer": {"name": "minmax"}}
METHODS: dict[str, list[dict]] = {
    "rtn": [{"name": "rtn", "weight": W4, "activations": STATIC_A8}],
    "gptq": [{"name": "gptq", "weight": W4, "activations": {**STATIC_A8, "observer": {"name": "percentile"}}}],
    "awq": [{"name": "awq", "weight": {**W4, "symmetric": False}, "grid": 10},
            {"name": "rtn", "weight": {**W4, "symmetric": False}}],
    "smoothquant": [{"name": "smoothquant", "alpha_search": True, "alpha_grid": [0.3, 0.5, 0.7, 0.9]},
                    {"name": "rtn", "weight": {"bits": 8, "granularity": "channel"},
                     "activations": {"bits": 8, "granularity": "token"}}],
}
N_SAMPLES, SEQ_LEN, BATCH = 8, 32, 2  # each rank: 2 of the single process's 4 batches


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # outlier channels, so that the rescalers' statistics matter
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = 8.0
    return model


def quantized_state(method: str) -> dict[str, torch.Tensor]:
    """The calibrated model's state dict for ``method``, calibrated on this rank's share of the samples."""
    model = tiny_model()
    samples = torch.randint(0, 256, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    steps = build_steps(METHODS[method], {"name": "minmax"})
    calibrate(model, mapping_for(model), distributed.shard(samples), steps, batch_size=BATCH, progress=False)
    return {key: value.clone() for key, value in model.state_dict().items()}


def activations() -> torch.Tensor:
    """Inputs [tokens, features] with outlier channels, split over ranks by ``distributed.shard``."""
    x = torch.randn(96, 48, generator=torch.Generator().manual_seed(2))
    return x * torch.linspace(0.1, 10.0, 48)


def statistics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic the transforms accumulate, observed on ``x`` in batches of 16 tokens and combined."""
    hessian, hessian64 = HessianAccumulator(x.shape[1]), HessianAccumulator(x.shape[1], torch.float64)
    means, maxima = ChannelStat("mean"), ChannelStat("max")
    observers = {name: build_observer(name, QuantSpec(bits=8, granularity="tensor", symmetric=False))
                 for name in ("minmax", "percentile")}
    for batch in x.split(16):
        hessian.add(batch)
        hessian64.add(batch)
        means.update(batch)
        maxima.update(batch)
        for observer in observers.values():
            observer.update(batch)
    stats = {"hessian": hessian.all_reduce().hessian.clone(), "hessian64": hessian64.all_reduce().hessian.clone(),
             "mean": means.result(), "max": maxima.result()}
    for name, observer in observers.items():
        stats[f"{name}.scale"], stats[f"{name}.zero"] = observer.all_reduce().qparams()
    return stats


def _worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = {method: quantized_state(method) for method in METHODS}
        results["statistics"] = statistics(distributed.shard(activations()))
        torch.save(results, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    directory = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(directory),), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


def test_statistics_combined_over_ranks_are_those_of_all_tokens(two_ranks):
    single = statistics(activations())
    for key, value in single.items():
        assert torch.allclose(two_ranks[0]["statistics"][key], value, rtol=1e-5, atol=1e-6), key
        assert torch.equal(two_ranks[0]["statistics"][key], two_ranks[1]["statistics"][key]), key


def integer_agreement(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """The fraction of quantized weights' integers that two calibrated models share."""
    keys = [key for key in one if key.endswith("weight_int")]
    return sum((one[key] == other[key]).float().mean().item() for key in keys) / len(keys)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_gloo_ranks_decide_what_one_process_decides(two_ranks, method):
    single = quantized_state(method)
    ranks = [state[method] for state in two_ranks]
    assert ranks[0].keys() == single.keys()
    for key in single:  # every rank holds the same model
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # The first linears of the first block see the same statistics up to summation order: equal grids.
    for key in ("self_attn.q_proj.weight", "self_attn.q_proj.weight_scale", "input_layernorm.weight"):
        key = f"model.layers.0.{key}"
        assert torch.allclose(single[key], ranks[0][key], rtol=1e-5, atol=1e-7), key
    # Later a value on a rounding boundary may round the other way, and GPTQ's error compensation carries that
    # on: nearly every integer is still the same (one process on half the samples shares 50-75%).
    assert integer_agreement(single, ranks[0]) > 0.97


def test_float64_sums_are_those_of_one_process_to_the_last_float32_bit(two_ranks):
    """GPTQ's rounding carries any difference in H on (above: 97% of the integers agree). In float32 the ranks'
    split of the tokens changes H's last bits; accumulated in float64 (``hessian_dtype=float64``) it changes them
    below float32's resolution, so the ranks solve the single process's H (measured on the embedded default:
    equal weights and perplexity with 2 ranks as with 1)."""
    single, ranks = statistics(activations()), two_ranks[0]["statistics"]
    assert not torch.equal(single["hessian"], ranks["hessian"])
    assert torch.equal(single["hessian64"].float(), ranks["hessian64"].float())
    assert torch.equal(single["mean"], ranks["mean"])  # AWQ's mean |x|, summed in float64 (``ChannelStat``)


def test_half_the_samples_alone_decide_differently(two_ranks):
    """The comparison above can fail: one process on one rank's share, without combining statistics, decides
    another model (so the agreement is the all-reduce's doing)."""
    model = tiny_model()
    samples = torch.randint(0, 256, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    steps = build_steps(METHODS["gptq"], {"name": "minmax"})
    calibrate(model, mapping_for(model), samples[: N_SAMPLES // WORLD], steps, batch_size=BATCH, progress=False)
    assert integer_agreement(model.state_dict(), two_ranks[0]["gptq"]) < 0.9
    half = statistics(activations()[: len(activations()) // WORLD])
    assert not torch.allclose(half["hessian"], two_ranks[0]["statistics"]["hessian"], rtol=1e-3)


FAILING_RANK = """
import torch
from ptq import distributed

distributed.init_from_env()

def step():
    if distributed.rank() == 1:
        raise ValueError("rank one cannot go on")
    distributed.all_reduce_sum(torch.ones(1))  # rank 0 waits here for a rank that is gone

distributed.fail_fast(step)
"""


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING_RANK))
    result = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={WORLD}", str(script)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "rank one cannot go on" in result.stderr
    assert "[rank 1/2] failed" in result.stderr


RUN = ["model=tiny-llama", "method=gptq", "group_size=32", "data.n_samples=8", "data.seq_len=64",
       "data.batch_size=2", "eval.max_windows=4", "eval.seq_len=64", "progress=false", "export=ptq"]


def test_torchrun_writes_once_and_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PTQ_CACHE_DIR": str(tmp_path / "models")}
    common = [*RUN, f"eval.cache_dir={tmp_path / 'cache'}"]
    two = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={WORLD}", "run.py", *common,
                          "logger=wandb", f"hydra.run.dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "run.py", *common, "logger=none", f"hydra.run.dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")}
    assert results["two"]["complete"] and (tmp_path / "two" / "export" / "ptq_quantization.json").is_file()
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs
    ppl = {name: r["metrics"]["quantized"]["perplexity"] for name, r in results.items()}
    assert ppl["two"] == pytest.approx(ppl["one"], rel=1e-3)
