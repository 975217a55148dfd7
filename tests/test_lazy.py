"""Lazy block loading (``ptq.models.lazy``): a model built on the meta device whose blocks are read from the
safetensors shards one at a time calibrates to the same weights, perplexity and export as the model loaded whole,
keeps its blocks on the meta device between uses, and its peak memory grows by far less than its size."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from ptq.calibrate import calibrate
from ptq.config import ConfigError
from ptq.eval.perplexity import blockwise_perplexity, perplexity
from ptq.export.ptq_format import load_ptq_checkpoint
from ptq.models.lazy import LazyLoadError, checkpoint_gb, load_lazy, wants_lazy
from ptq.models.loading import load_pretrained, resolve_source
from ptq.models.mappings import blocks_of, mapping_for
from ptq.pipeline import run
from ptq.transforms import build_steps

ROOT = Path(__file__).resolve().parent.parent
W4 = {"bits": 4, "granularity": "group", "group_size": 32}
METHODS = {
    "gptq": [{"name": "gptq", "weight": W4}],
    "awq": [{"name": "awq", "weight": {**W4, "symmetric": False}, "grid": 5},
            {"name": "rtn", "weight": {**W4, "symmetric": False}}],
}


def synthetic() -> object:
    """scripts/make_synthetic_model.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("make_synthetic_model", ROOT / "scripts" / "make_synthetic_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_synthetic_model", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A three-block Qwen2 (biased q/k/v) in shards of at most 40 kB, so blocks span several files."""
    make = synthetic()
    shape = make.Shape(hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2)
    return make.write_model(tmp_path_factory.mktemp("synthetic") / "qwen2", shape, "qwen2", max_shard_mb=0.04)


def test_synthetic_checkpoint_is_sharded_and_loads_as_its_family(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = load_pretrained(resolve_source(str(checkpoint)), "float32")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.model.layers[0].self_attn.q_proj.bias is not None
    std = model.model.layers[1].mlp.up_proj.weight.std().item()
    assert 0.018 < std < 0.022 and torch.equal(model.model.norm.weight, torch.ones(64))
    again = synthetic().make_tensor("model.layers.1.mlp.up_proj.weight", (128, 64), seed=0, std=0.02)
    assert torch.equal(again, model.model.layers[1].mlp.up_proj.weight)  # seeded by name, not by shard


def test_lazy_model_keeps_blocks_on_meta_and_the_rest_loaded(checkpoint):
    model, _ = load_lazy(resolve_source(str(checkpoint)), "float32")
    blocks = blocks_of(model, mapping_for(model))
    assert all(p.is_meta for p in blocks.parameters())
    assert not model.model.embed_tokens.weight.is_meta and not model.model.rotary_emb.inv_freq.is_meta
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


@pytest.mark.parametrize("method", list(METHODS))
def test_lazy_calibration_equals_eager(checkpoint, method):
    source = resolve_source(str(checkpoint))
    samples = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 49152, (3, 32), generator=torch.Generator().manual_seed(1))
    eager = load_pretrained(source, "float32")
    lazy, blocks = load_lazy(source, "float32")
    mapping = mapping_for(eager)
    assert blockwise_perplexity(lazy, mapping, blocks, windows, 2, progress=False) == \
        perplexity(eager, windows, 2, progress=False)
    for model, source_of_blocks in ((eager, None), (lazy, blocks)):
        options = {"source": source_of_blocks} if source_of_blocks is not None else {}
        calibrate(model, mapping, samples, build_steps(METHODS[method], {"name": "minmax"}), batch_size=2,
                  progress=False, **options)
    assert all(p.is_meta for p in blocks_of(lazy, mapping).parameters())  # freed after calibration
    for index, block in enumerate(blocks_of(lazy, mapping)):
        blocks.materialize(index, block)
        expected = eager.model.layers[index].state_dict()
        got = block.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), index
        blocks.release(index, block)
    assert blockwise_perplexity(lazy, mapping, blocks, windows, 2, progress=False) == \
        perplexity(eager, windows, 2, progress=False)


def test_auto_is_lazy_above_the_threshold_only(checkpoint):
    source = resolve_source(str(checkpoint))
    size = checkpoint_gb(checkpoint)
    assert wants_lazy("auto", source, size / 2) and not wants_lazy("auto", source, size * 2)
    assert not wants_lazy(False, source, 0.0) and wants_lazy(True, source, 1e9)
    with pytest.raises(LazyLoadError, match=r"^model.lazy='maybe': allowed are true, false, auto$"):
        wants_lazy("maybe", source, 1.0)
    with pytest.raises(LazyLoadError, match=r"^model.lazy_threshold_gb=-1: allowed is a number >= 0$"):
        wants_lazy("auto", source, -1)
    with pytest.raises(LazyLoadError, match="model.lazy=true: it is not a local directory"):
        wants_lazy(True, resolve_source("smollm2-135m"), 1.0)


RUN = ["model=hf", "logger=none", "data.n_samples=4", "data.seq_len=32", "data.batch_size=2", "eval.max_windows=3",
       "eval.seq_len=32", "progress=false", "method=gptq", "group_size=32"]


def test_lazy_run_exports_what_the_eager_run_exports(checkpoint, tmp_path):
    source = f"model.source={checkpoint}"
    results = {}
    for lazy in (True, False):
        cfg = compose_config([*RUN, source, f"model.lazy={str(lazy).lower()}", "export=ptq"], tmp_path)
        results[lazy] = run(cfg, tmp_path / f"lazy-{lazy}")
    assert results[True]["metrics"] == results[False]["metrics"]
    lazy_dir, eager_dir = (Path(results[flag]["export"]["path"]) for flag in (True, False))
    assert (lazy_dir / "model.safetensors.index.json").is_file() and (eager_dir / "model.safetensors").is_file()
    got, expected = (load_ptq_checkpoint(d).state_dict() for d in (lazy_dir, eager_dir))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    reloaded = run(compose_config([*RUN, f"model.source={lazy_dir}", "method=none"], tmp_path), tmp_path / "reloaded")
    assert reloaded["metrics"]["quantized"] == results[True]["metrics"]["quantized"]


@pytest.mark.parametrize("override, message", [
    ("export=gguf", "export=gguf (written from the whole model): needs the whole model"),
    ("backend=torch", "backend=torch (packs the whole model): needs the whole model"),
    ("eval.tasks=[pydoc_cloze]", "eval.tasks=['pydoc_cloze'] (lm-eval tasks): needs the whole model"),
])
def test_what_needs_the_whole_model_is_refused_before_loading(checkpoint, tmp_path, override, message):
    cfg = compose_config([*RUN, f"model.source={checkpoint}", "model.lazy=true", override], tmp_path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}.*model\.lazy=false$"):
        run(cfg, tmp_path)


PEAK = """
import sys, threading, torch
from ptq.calibrate import calibrate
from ptq.models.lazy import load_lazy
from ptq.models.loading import load_pretrained, resolve_source, load_tokenizer
from ptq.models.mappings import mapping_for
from ptq.transforms import build_steps

torch.set_num_threads(1)
source = resolve_source(sys.argv[1])
load_tokenizer(source)
steps = build_steps([{"name": "rtn", "weight": {"bits": 4, "granularity": "group", "group_size": 128}}],
                    {"name": "minmax"})
def rss_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])


peak = [0]
done = threading.Event()


def sample():  # the largest resident size seen from here on: a kernel's own peak (VmHWM) cannot always be restarted
    while not done.is_set():
        peak[0] = max(peak[0], rss_kb())
        done.wait(0.002)


before = rss_kb()
sampler = threading.Thread(target=sample)
sampler.start()
if sys.argv[2] == "lazy":
    model, blocks = load_lazy(source, "float32")
    calibrate(model, mapping_for(model), torch.zeros(1, 1, dtype=torch.long), steps, progress=False, source=blocks)
else:
    model = load_pretrained(source, "float32")
    calibrate(model, mapping_for(model), torch.zeros(1, 1, dtype=torch.long), steps, progress=False)
done.set()
sampler.join()
print((max(peak[0], rss_kb()) - before) * 1024)
"""


def test_lazy_peak_memory_grows_by_embeddings_and_one_block(tmp_path):
    """A 330 MB float32 model (16 blocks of 16 MB, 100 MB of tied embeddings): calibrated lazily, the peak RSS
    grows by the embeddings and a block or two; loaded whole, by the model's size (the measurement's control).
    Linux only: a thread samples the resident size (VmRSS) from after the imports on; getrusage's ru_maxrss and
    VmHWM keep the imports' peak (restarting VmHWM through /proc/self/clear_refs is not honoured everywhere), so
    they read 0 growth at times."""
    make = synthetic()
    shape = make.Shape(hidden=512, intermediate=1536, layers=16, heads=8, kv_heads=8)
    directory = make.write_model(tmp_path / "model", shape, max_shard_mb=64)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent(PEAK))
    growth = {}
    for mode in ("lazy", "eager"):
        out = subprocess.run([sys.executable, str(script), str(directory), mode], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, check=True)
        growth[mode] = int(out.stdout.split()[-1])
    embeddings = 49152 * 512 * 4
    assert growth["eager"] > 0.9 * size, growth
    # the embeddings, a block being read, calibrated and saved, and allocator slack: half the blocks' size bounds it
    assert growth["lazy"] < embeddings + 0.5 * (size - embeddings), (growth, size)
