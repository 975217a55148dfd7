"""The end-of-run summary table (plain text, for the terminal)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def summary_table(results: dict[str, Any]) -> str:
    """Baseline vs quantized: every metric, bits per weight, size, and time per stage."""
    metrics = results["metrics"]
    rows: list[tuple[str, Any, Any]] = []
    names = sorted({name for stage in metrics.values() for name in stage if not name.endswith("_stderr")})
    for name in names:
        rows.append((name, metrics["baseline"].get(name), metrics["quantized"].get(name)))
    size = results["size"]
    rows.append(("bits per weight (model)", 16.0, size["bits_per_weight"]))
    rows.append(("bits per weight (linears)", 16.0, size["linear_bits_per_weight"]))
    rows.append(("size (MB)", size["fp16_mb"], size["quantized_mb"]))
    if "packed_mb" in size:
        rows.append(("stored in memory (MB)", None, size["packed_mb"]))
    if "checkpoint_mb" in size:
        rows.append(("checkpoint on disk (MB)", None, size["checkpoint_mb"]))
    export = results.get("export")
    if export:
        rows.append((f"export {export['format']} on disk (MB) vs fp16", export["fp16_mb"], export["mb"]))
        rows.append((f"export {export['format']} on disk (MB) vs fp32", export["fp32_mb"], export["mb"]))
    width = max(len(r[0]) for r in rows) + 2
    cached = " (cached)" if results.get("baseline_from_cache") else ""
    lines = [f"ptq · {results['method']} · {results['eval_windows']} eval windows",
             f"{'':<{width}}{'baseline' + cached:>18}{'quantized':>14}"]
    lines += [f"{name:<{width}}{_fmt(b):>18}{_fmt(q):>14}" for name, b, q in rows]
    times = " · ".join(f"{stage} {seconds:.1f}s" for stage, seconds in results["timings_s"].items())
    lines.append(f"time: {times}")
    for step, learned in (results.get("learning") or {}).items():
        lines.append(f"{step} learned: {learned['iterations']} iterations, loss {learned['first_loss']:.4f} → "
                     f"{learned['last_loss']:.4f} in {learned['seconds']:.1f}s")
    if export:
        lines.append(f"export: {export['path']}")
    return "\n".join(lines)
