"""End to end on a tiny random Llama: a run writes results.json, a W&B offline run, and reuses its baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptq.pipeline import baseline_key, run

ROOT = Path(__file__).resolve().parent.parent


def test_run_writes_results_and_summary(tiny_config, tmp_path, capsys):
    results = run(tiny_config("method=gptq", "bits=3", "group_size=32"), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] and saved["method"] == "gptq"
    for stage in ("baseline", "quantized"):
        assert saved["metrics"][stage]["perplexity"] > 1
    assert saved["size"]["quantized_mb"] < saved["size"]["fp16_mb"]
    assert len(saved["layers"]) == 14 and all(row["loss"] is not None for row in saved["layers"].values())
    assert {"load", "calibrate", "eval_quantized"} <= set(saved["timings_s"])
    out = capsys.readouterr().out
    assert "perplexity" in out and "bits per weight" in out
    assert results["metrics"] == saved["metrics"]


def test_baseline_is_cached_across_runs(tiny_config, tmp_path):
    first = run(tiny_config("bits=4"), tmp_path / "a")
    second = run(tiny_config("bits=3"), tmp_path / "b")
    assert not first["baseline_from_cache"] and second["baseline_from_cache"]
    assert first["metrics"]["baseline"] == second["metrics"]["baseline"]
    third = run(tiny_config("eval.max_windows=2"), tmp_path / "c")
    assert not third["baseline_from_cache"]


def test_baseline_key_follows_the_contents_of_local_task_files(tiny_config, tmp_path):
    data = tmp_path / "arc_easy.jsonl"
    data.write_text('{"question": "a"}\n')
    cfg = tiny_config("eval.tasks=[arc_easy]", f"+eval.task_data.arc_easy.test={data}")
    windows = torch.zeros(2, 8, dtype=torch.long)
    before = baseline_key(cfg, windows)
    data.write_text('{"question": "b"}\n')
    assert baseline_key(cfg, windows) != before


def test_offline_wandb_run_is_written(tiny_config, tmp_path):
    results = run(tiny_config("logger=wandb", "logger.mode=offline"), tmp_path)
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("*.wandb"))
    assert results["wandb_dir"]


def test_w8a8_quantizes_activations(tiny_config, tmp_path):
    results = run(tiny_config("method=rtn_w8a8"), tmp_path)
    assert results["metrics"]["quantized"]["perplexity"] == pytest.approx(
        results["metrics"]["baseline"]["perplexity"], rel=0.05)


def test_a_completed_run_is_skipped_and_an_interrupted_one_recomputed(tiny_config, tmp_path):
    cfg = tiny_config("bits=3")
    first = run(cfg, tmp_path)
    again = run(cfg, tmp_path)
    assert again["timings_s"] == first["timings_s"]  # read back, not recomputed
    results = json.loads((tmp_path / "results.json").read_text())
    results["complete"] = False  # what a run killed before its end would leave (it writes nothing at all)
    (tmp_path / "results.json").write_text(json.dumps(results))
    recomputed = run(cfg, tmp_path)
    assert recomputed["complete"] and recomputed["timings_s"] != first["timings_s"]


def test_packed_torch_backend_matches_fake_quant(tiny_config, tmp_path):
    fake = run(tiny_config("method=gptq", "bits=4", "group_size=32"), tmp_path / "fake")
    packed = run(tiny_config("method=gptq", "bits=4", "group_size=32", "backend=torch"), tmp_path / "packed")
    assert packed["metrics"]["quantized"]["perplexity"] == pytest.approx(
        fake["metrics"]["quantized"]["perplexity"], rel=1e-3)
    assert packed["size"]["packed_mb"] < fake["size"]["fp16_mb"] * 2  # the fp32 embeddings dominate a tiny model


def test_a_multirun_groups_its_wandb_runs_by_sweep_name(tmp_path):
    from conftest import TINY

    sweep = tmp_path / "multirun"
    command = [sys.executable, str(ROOT / "run.py"), "-m", *TINY, "logger=wandb", "logger.mode=offline", "bits=3,4",
               "sweep_name=grouped", f"hydra.sweep.dir={sweep}", f"eval.cache_dir={tmp_path / 'cache'}"]
    subprocess.run(command, check=True, capture_output=True, timeout=600, cwd=tmp_path)
    runs = [json.loads(path.read_text()) for path in sweep.glob("*/results.json")]
    assert len(runs) == 2 and {r["config"]["logger"]["group"] for r in runs} == {"grouped"}
    assert all(list(Path(r["wandb_dir"]).parent.glob("*.wandb")) for r in runs)  # <run>/files: its offline run
