"""ptq vs llm-compressor on the same calibration samples and the same evaluation windows: perplexity and time.

Usage (with ptq's python):

    .venv/bin/python scripts/compare_llmcompressor.py --method gptq --bits 4 --group-size 64 [--asymmetric]
        [--peer-python ../peer-venv/bin/python] [--n-samples 64 --seq-len 512] [--max-windows N]

``--method`` is a ptq method (``configs/method/<method>.yaml``); its steps, resolved by Hydra exactly as
``run.py`` would, are run in-process with ``ptq.calibrate.calibrate`` and are also translated into the
matching llm-compressor recipe (gptq → GPTQModifier, rtn → QuantizationModifier, smoothquant →
SmoothQuantModifier, awq → AWQModifier; lm_head left in full precision on both sides), which
``scripts/_llmcompressor_peer.py`` runs with ``oneshot`` in llm-compressor's own virtualenv (it pins other
transformers versions than ptq, so it is never imported here). Calibration samples and evaluation windows are built
once by ``ptq.data`` and handed to both sides in a .pt file; perplexity is exp of the mean token NLL over
non-overlapping windows, each scored alone, on both sides. "calibrate s" is the wall time of calibration only
(ptq: ``calibrate``; llm-compressor: ``oneshot``), excluding model loading and evaluation; the two run one after
the other with the same number of torch threads.

The model is loaded by ptq (the embedded GGUF by default) and saved once as a Hugging Face directory
(safetensors) under ``--cache-dir``, which llm-compressor loads: ``oneshot`` re-reads the model's config from
``model.config.name_or_path``, which a GGUF directory does not have. Both sides check that they see the same
full-precision model (perplexity on the first ``--check-windows`` windows).

On a CPU shared with other jobs use ``--threads 1``: with more torch threads than free cores, OpenMP's
spinning barriers make GPTQ's many small ops 10-100x slower and the timings meaningless. The thread count also
changes float summation order, hence rounding decisions: expect perplexities to move by ~±2% between thread
counts, on both sides.

Setting up the peer (once; its torch must be installed first so that pip does not pull a CUDA build):

    python3 -m venv ../peer-venv
    ../peer-venv/bin/pip install torch==2.13.0 && ../peer-venv/bin/pip install llmcompressor
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).resolve().parent / "_llmcompressor_peer.py"
DEFAULT_PEER_PYTHON = os.environ.get("PTQ_PEER_PYTHON", str(REPO.parent / "peer-venv" / "bin" / "python"))
PEER_STEPS = ("gptq", "rtn", "smoothquant", "awq")


def group_size(value: str) -> int | None:
    return None if value.lower() in ("none", "null", "channel") else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="gptq", help="a ptq method: configs/method/<method>.yaml")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=group_size, default=128, help="integer, or 'none' for per channel")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512, help="calibration sample length")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: all)")
    parser.add_argument("--model", default="smollm2-135m", help="ptq model config group (configs/model)")
    parser.add_argument("--data", default="pydoc", help="ptq data config group (configs/data)")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override for ptq (repeatable)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                        help="python of the llm-compressor venv (default: $PTQ_PEER_PYTHON or ../peer-venv)")
    parser.add_argument("--peer-batch-size", type=int, default=None,
                        help="llm-compressor's calibration batch size (default: ptq's data.batch_size)")
    parser.add_argument("--peer-pipeline", default=None,
                        help="llm-compressor's calibration pipeline (default: its own)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads on both sides")
    parser.add_argument("--check-windows", type=int, default=2)
    parser.add_argument("--cache-dir", default="~/.cache/ptq/compare", help="where the exported HF model is kept")
    parser.add_argument("--skip", choices=("ptq", "peer"), default=None, help="run one side only")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


def compose(args: argparse.Namespace) -> Any:
    """ptq's config for this comparison, composed and resolved as ``run.py`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ptq.config import CONFIG_DIR, register_configs

    register_configs()
    overrides = [
        f"method={args.method}", f"bits={args.bits}", f"symmetric={str(args.symmetric).lower()}",
        f"group_size={'null' if args.group_size is None else args.group_size}", f"model={args.model}",
        f"data={args.data}", f"data.n_samples={args.n_samples}", f"data.seq_len={args.seq_len}",
        f"eval.seq_len={args.eval_seq_len}", f"eval.max_windows={args.max_windows or 'null'}", "logger=none",
        "device=cpu", f"progress={str(args.progress).lower()}", *args.override,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def export_hf(model: torch.nn.Module, tokenizer: Any, cfg: Any, cache_dir: Path) -> Path:
    """The full-precision model as a Hugging Face directory (safetensors), written once per model source."""
    from omegaconf import OmegaConf

    from ptq.models import resolve_source

    source = resolve_source(cfg.model.source, cfg.model.gguf_file)
    origin = Path(source.location) / (source.gguf_file or "")
    stamp = f"{origin.stat().st_size}-{origin.stat().st_mtime_ns}" if origin.exists() else ""
    blob = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), str(origin), stamp], sort_keys=True)
    path = cache_dir.expanduser() / f"{cfg.model.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if not (path / "config.json").is_file():
        staging = path.with_name(path.name + ".partial")
        with without_gguf_marks(model):
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(path)
    return path


@contextmanager
def without_gguf_marks(model: Any) -> Iterator[None]:
    """A GGUF-loaded model holds dequantized float weights but keeps transformers' GGUF quantizer, which refuses
    ``save_pretrained`` and would make llm-compressor reject the model as already quantized: hide it meanwhile."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    if quantizer is not None:
        model.hf_quantizer = None
    if config is not None:
        del model.config.quantization_config
    try:
        yield
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if config is not None:
            model.config.quantization_config = config


def cached_baseline(cfg: Any, windows: torch.Tensor, cache_dir: Path, compute: Any) -> float:
    """The full-precision perplexity on these exact windows, computed once per (model, windows)."""
    from omegaconf import OmegaConf

    blob = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True).encode()
    key = hashlib.sha256(blob + windows.numpy().tobytes()).hexdigest()[:24]
    path = cache_dir.expanduser() / "baselines" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["perplexity"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"perplexity": value, "model": cfg.model.name, "windows": int(windows.shape[0])}))
    return value


def ptq_commit() -> str | None:
    """ptq's git commit (with '+dirty' when the work tree has changes), for the record; None outside git."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_ptq(cfg: Any, steps: list[Any], model: torch.nn.Module, samples: torch.Tensor,
            windows: torch.Tensor) -> dict[str, Any]:
    from ptq.calibrate import calibrate
    from ptq.eval.perplexity import perplexity
    from ptq.models import mapping_for

    start = time.perf_counter()
    calibrate(model, mapping_for(model), samples, steps, "cpu", cfg.data.batch_size, cfg.method.propagate,
              cfg.progress)
    seconds = time.perf_counter() - start
    return {"perplexity": perplexity(model, windows, cfg.eval.batch_size, "cpu", cfg.progress), "calibrate_s": seconds}


def run_peer(args: argparse.Namespace, cfg: Any, model_dir: Path, data: Path, work: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    steps = OmegaConf.to_container(cfg.method.steps, resolve=True)
    unknown = [s["name"] for s in steps if s["name"] not in PEER_STEPS]
    if unknown:
        raise SystemExit(f"error: method={args.method}: no llm-compressor equivalent for step {unknown[0]!r}")
    if cfg.observer.name != "minmax":
        print(f"note: observer={cfg.observer.name}: llm-compressor keeps its default (min-max) observer", flush=True)
    (work / "steps.json").write_text(json.dumps(steps))
    out, log = work / "peer.json", work / "peer.log"
    command = [
        args.peer_python, str(PEER_SCRIPT), "--model-dir", str(model_dir), "--data", str(data),
        "--steps", str(work / "steps.json"), "--out", str(out), "--threads", str(args.threads),
        "--calib-batch-size", str(args.peer_batch_size or cfg.data.batch_size),
        "--eval-batch-size", str(cfg.eval.batch_size), "--check-windows", str(args.check_windows),
    ]
    if args.peer_pipeline:
        command += ["--pipeline", args.peer_pipeline]
    print(f"llm-compressor: running {PEER_SCRIPT.name} (log: {log})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if status != 0 or not out.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{tail}\nerror: llm-compressor's side failed (exit {status}); full log: {log}")
    return json.loads(out.read_text())


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    def line(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    lines = [line(row) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(args: argparse.Namespace, cfg: Any, results: dict[str, Any]) -> str:
    baseline = results["baseline_perplexity"]
    scheme = f"w{cfg.bits} {'g' + str(cfg.group_size) if cfg.group_size else 'per-channel'} " \
             f"{'sym' if cfg.symmetric else 'asym'}"
    rows = [["method", "tool", "perplexity", "vs fp", "calibrate s", "time ratio"]]
    ptq_s = results.get("ptq", {}).get("calibrate_s")
    for tool in ("ptq", "llm-compressor"):
        if tool not in results:
            continue
        r = results[tool]
        ratio = f"{r['calibrate_s'] / ptq_s:.2f}x" if ptq_s else "-"
        rows.append([f"{args.method} {scheme}", tool, f"{r['perplexity']:.4f}", f"{r['perplexity'] - baseline:+.4f}",
                     f"{r['calibrate_s']:.1f}", ratio])
    head = (f"model {cfg.model.name} · data {cfg.data.name} · calibration {cfg.data.n_samples}×{cfg.data.seq_len} · "
            f"evaluation {results['eval_windows']}×{cfg.eval.seq_len} · torch threads {args.threads}\n"
            f"ptq {results.get('ptq_commit')} · llm-compressor "
            f"{results.get('peer', {}).get('versions', {}).get('llmcompressor', '-')}\n"
            f"fp baseline perplexity: {baseline:.4f}")
    checks = results.get("fp_check", {})
    if len(checks) == 2:
        a, b = checks["ptq"], checks["llm-compressor"]
        same = "same model" if abs(a - b) <= 1e-3 * a else "MODELS DIFFER"
        head += f"   (fp on first {args.check_windows} windows: ptq {a:.4f}, llm-compressor {b:.4f}: {same})"
    foot = "time ratio = tool's calibrate s / ptq's calibrate s (above 1: ptq is faster)"
    return f"{head}\n{table(rows)}\n{foot}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (REPO / "configs" / "method" / f"{args.method}.yaml").is_file():
        raise SystemExit(f"error: method={args.method!r}: ptq has no configs/method/{args.method}.yaml")
    if args.skip != "peer" and not Path(args.peer_python).is_file():
        raise SystemExit(f"error: --peer-python {args.peer_python}: not found (see this script's docstring)")
    torch.set_num_threads(args.threads)

    from ptq.config import ConfigError, validate
    from ptq.data import calibration_samples, evaluation_windows, load_tokens
    from ptq.eval.perplexity import perplexity
    from ptq.models import load_pretrained, load_tokenizer, resolve_source

    cfg = compose(args)
    try:
        steps = validate(cfg)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    torch.manual_seed(cfg.seed)
    source = resolve_source(cfg.model.source, cfg.model.gguf_file)
    model, tokenizer = load_pretrained(source, cfg.model.dtype), load_tokenizer(source)
    tokens = load_tokens(cfg.data.name, tokenizer, cfg.data.path)
    samples = calibration_samples(tokens.calibration, cfg.data.n_samples, cfg.data.seq_len, cfg.seed)
    windows = evaluation_windows(tokens.evaluation, cfg.eval.seq_len, cfg.eval.max_windows)
    model_dir = export_hf(model, tokenizer, cfg, Path(args.cache_dir)) if args.skip != "peer" else None

    evaluate = functools.partial(perplexity, model, windows, cfg.eval.batch_size, "cpu", cfg.progress)
    baseline = cached_baseline(cfg, windows, Path(args.cache_dir), evaluate)
    results: dict[str, Any] = {"baseline_perplexity": baseline, "eval_windows": int(windows.shape[0]), "fp_check": {},
                               "ptq_commit": ptq_commit()}
    results["fp_check"]["ptq"] = perplexity(model, windows[: args.check_windows], cfg.eval.batch_size, "cpu", False)

    work = Path(tempfile.mkdtemp(prefix="ptq-compare-"))
    try:
        data = work / "data.pt"
        torch.save({"samples": samples, "windows": windows}, data)
        if args.skip != "ptq":
            results["ptq"] = run_ptq(cfg, steps, model, samples, windows)
            print(f"ptq: perplexity {results['ptq']['perplexity']:.4f}, "
                  f"calibrate {results['ptq']['calibrate_s']:.1f} s", flush=True)
        del model
        if args.skip != "peer":
            peer = run_peer(args, cfg, model_dir, data, work)
            results["llm-compressor"] = {"perplexity": peer["perplexity"], "calibrate_s": peer["calibrate_s"]}
            results["fp_check"]["llm-compressor"] = peer["fp_check_perplexity"]
            results["peer"] = peer
    except BaseException:
        print(f"(inputs and logs kept in {work})", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=2, default=str))
    print(report(args, cfg, results))


if __name__ == "__main__":
    sys.exit(main())
