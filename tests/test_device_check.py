"""scripts/device_check.py: its dry run passes here and lists every step; a failing, hanging or CUDA-only step is
recorded and the others still run; the wheel coverage, the staged model and the report say what they should."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_device_check() -> Any:
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("device_check", module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


dc = load_device_check()


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A wheel file holding only its METADATA: what the dry run's coverage check reads."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", metadata)
    return path


@pytest.fixture(scope="module")
def carry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A carried folder with a (metadata-only) wheel for every ptq dependency the device image lacks."""
    folder = tmp_path_factory.mktemp("carry")
    (folder / "wheels").mkdir()
    needed = dc.coverage(dc.ptq_requirements(), dc.local_provider)
    for name, provided in needed.provided.items():
        if provided.source == "local":
            fake_wheel(folder / "wheels", name, provided.version, provided.requires)
    return folder


def context(tmp_path: Path, carry: Path, budget_s: float = 600, dry_run: bool = True) -> Any:
    import time

    return dc.Context(sys.executable, tmp_path / "report", tmp_path / "work", carry, dry_run,
                      time.monotonic() + budget_s)


def python_step(name: str, code: str, timeout_s: int = 60, needs: tuple[str, ...] = ()) -> Any:
    return dc.Step(name, f"fake {name}", lambda ctx: [ctx.python, "-c", code], timeout_s, needs)


def test_dry_run_passes_and_lists_every_step(tmp_path, carry):
    out = subprocess.run([str(ROOT / "scripts" / "device_check.sh"), "--dry-run", "--report", str(tmp_path / "r"),
                          "--carry", str(carry), "--work", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for step in dc.STEPS:
        assert f"[{step.name}]" in out.stdout
    steps = {s["name"]: s for s in json.loads((tmp_path / "r" / "report.json").read_text())["steps"]}
    assert list(steps) == [s.name for s in dc.STEPS]
    for step in dc.STEPS:
        expected = "skipped" if "cuda" in step.needs else "passed"
        assert steps[step.name]["status"] == expected, steps[step.name]
        if expected == "skipped":
            assert steps[step.name]["note"] == "needs CUDA (dry run)"
    report = (tmp_path / "r" / "report.md").read_text()
    for title, _ in dc.SECTIONS:
        assert f"## {title}" in report
    assert "missing: none" in report


def test_a_failing_or_hanging_step_is_recorded_and_the_rest_still_run(tmp_path, carry):
    steps = [python_step("boom", "import sys; print('partial'); sys.exit('it broke')"),
             python_step("hang", "import time; time.sleep(60)", timeout_s=1),
             python_step("gpu", "print('never')", needs=("cuda",)),
             python_step("after", "print('DEVICE_CHECK_RESULT {\"answer\": 42}')")]
    ctx = context(tmp_path, carry)
    lines: list[str] = []
    results = dc.run_steps(steps, ctx, lines.append)
    assert [r.status for r in results] == ["failed", "timeout", "skipped", "passed"]
    assert results[0].note == "it broke" and results[0].stdout.strip() == "partial"
    assert results[1].note == "stopped after 1 s" and results[1].seconds < 10
    assert results[2].note == "needs CUDA (dry run)"
    assert results[3].data == {"answer": 42}
    assert len(lines) == 2 * len(steps) and "$ " in lines[0]
    report = dc.write_report(results, ctx, 1.0).read_text()
    assert "| `boom` | failed |" in report and "| `after` | passed |" in report
    assert "===== hang: timeout" in (ctx.report / "steps.log").read_text()


def test_steps_past_the_budget_are_skipped(tmp_path, carry):
    results = dc.run_steps([python_step("late", "print(1)")], context(tmp_path, carry, budget_s=1), lambda s: None)
    assert results[0].status == "skipped" and results[0].note == "out of time budget"


def test_coverage_lists_missing_conflicts_and_what_is_left_out():
    from packaging.requirements import Requirement

    available = {"a": dc.Provided("wheel", "1.0", ["b>=2", "old; python_version < '3.9'", "wandb"]),
                 "b": dc.Provided("image", "1.5")}
    result = dc.coverage([Requirement("a"), Requirement("c")], available.get)
    assert set(result.provided) == {"a", "b"}
    assert set(result.missing) == {"c"}
    assert result.conflicts == ["b 1.5 does not satisfy b>=2"]
    assert result.not_carried == {"wandb": dc.NOT_CARRIED["wandb"]}


def test_the_static_view_is_the_image_then_the_wheels(tmp_path):
    fake_wheel(tmp_path, "hydra-core", "1.3.2", ["omegaconf<2.4,>=2.2"])
    provide = dc.static_provider(dc.carried_wheels(tmp_path))
    assert provide("torch").source == "image"
    assert provide("hydra-core").version == "1.3.2" and provide("hydra-core").requires == ["omegaconf<2.4,>=2.2"]
    assert provide("omegaconf") is None


def test_staged_model_parts_join_into_the_same_file(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(bytes(range(256)) * 40)
    monkeypatch.setattr(dc, "embedded_gguf", lambda: gguf)
    monkeypatch.setattr(dc, "MODEL_PART_BYTES", 1000)
    assert dc.stage_model(tmp_path / "carry") == 0
    assert (tmp_path / "carry" / "model-1" / "model.gguf.part1").stat().st_size == 1000
    dc.join_model(tmp_path / "carry", tmp_path / "site")
    assert (tmp_path / "site" / dc.MODEL_PACKAGE / "model.gguf").read_bytes() == gguf.read_bytes()
    (tmp_path / "carry" / "model-2" / "model.gguf.part2").write_bytes(b"stale")
    with pytest.raises(ValueError, match="SHA-256"):
        dc.join_model(tmp_path / "carry", tmp_path / "site2")
    assert not (tmp_path / "site2" / dc.MODEL_PACKAGE / "model.gguf").exists()


def test_block_times_runs_the_real_calibration_on_a_small_block():
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    data = dc.block_times("gptq", blocks=3, samples=4, seq_len=32, device="cpu", dtype="float32", shape=shape)
    assert len(data["block_s"]) == 3 and all(s > 0 for s in data["block_s"])
    assert data["extrapolated_s"] == pytest.approx(data["steady_block_s"] * 31 + data["block_s"][0])


def test_end_to_end_results_are_read_and_shown_beside_the_cpu_run(tmp_path, carry):
    ctx = context(tmp_path, carry, dry_run=False)
    run = dc.E2E_RUNS[0]
    folder = ctx.work / "runs" / run.name
    folder.mkdir(parents=True)
    results = {"metrics": {"baseline": {"perplexity": 11.3}, "quantized": {"perplexity": 14.31}},
               "timings_s": {"load": 2.0, "calibrate": 12.5}, "baseline_from_cache": False}
    (folder / "results.json").write_text(json.dumps(results))
    data = run.results(ctx, "")
    assert data["perplexity"] == 14.31 and data["timings_s"]["calibrate"] == 12.5
    step = dc.StepResult(run.name, run.name, "", "passed", data=data)
    table = dc.section_e2e([step])
    cpu = dc.cpu_reference()
    assert f"| gptq | bfloat16 | 11.30 | 14.31 | {cpu['fp']} | {cpu['gptq']} | 12.5 |" in table


def test_pytest_summary_is_parsed():
    output = ("....\nSKIPPED [3] tests/test_kernels.py:90: needs CUDA\n"
              "===== 212 passed, 3 skipped, 1 warning in 80.12s =====\n")
    data = dc.pytest_summary(None, output)
    assert data["passed"] == 212 and data["skipped"] == 3 and data["summary"].startswith("212 passed")
    assert data["not_passed"] == ["SKIPPED [3] tests/test_kernels.py:90: needs CUDA"]
    result = dc.StepResult("kernel_tests", "", "pytest", "passed", data=data)
    assert "SKIPPED [3]" in dc.section_tests([result])
