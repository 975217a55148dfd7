"""A paper's table from a sweep: measured perplexities beside the published ones, as Markdown, CSV and a Pareto plot.

    python scripts/make_table.py multirun/gptq_table3 --expected experiments/gptq/expected.csv
    python scripts/make_table.py multirun/smollm2_table --csv table.csv --png pareto.png
    python scripts/make_table.py --wandb-project <entity>/<project>      # runs logged to W&B (network, login)

Rows are (model, method, bits, group), columns the evaluated datasets (perplexity) and any other metric. The
scheme of a row is read from the method's last weight step (so W8A8 methods show W8A8 whatever the top-level
``bits``), and every run's full-precision baseline gives the row ``fp``. With ``--expected`` (an
``experiments/<paper>/expected.csv``) each column gets the published value and measured − published beside it.
The plot puts every run at its bits per weight (scales and zeros included) against its perplexity, one panel
per (model, dataset), with the Pareto front (the lowest perplexity reachable at or below each size) dashed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
EXPECTED_COLUMNS = ("model", "method", "bits", "group", "dataset", "value")
METHOD_ORDER = ("fp", "rtn", "gptq", "gptq_r", "awq", "awq_gptq", "rtn_w8a8", "smoothquant", "smoothquant_gptq")
DATASET_ORDER = ("wikitext2", "ptb", "c4", "pydoc", "text")
FP_BITS = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32"}
BPW_KEYS = {"linear": "linear_bits_per_weight", "model": "bits_per_weight"}
BPW_LABELS = {
    "linear": "bits per weight of the quantized Linear layers, scales and zeros included [bit]",
    "model": "bits per weight of the whole model, embeddings and scales included [bit]",
}
FP_BITS_PER_WEIGHT = 16.0  # where the full-precision reference sits on the plot (fp16 storage)


@dataclass(frozen=True, order=True)
class Row:
    """One line of the table: what was quantized and how."""

    model: str
    method: str
    bits: str  # "W4", "W3", "W8A8", "FP16"
    group: str  # "g128", "channel", "-"


@dataclass(frozen=True)
class Point:
    """One measured value: a row's metric on one column (a dataset's perplexity, or another metric)."""

    row: Row
    column: str
    value: float
    bits_per_weight: float | None = None


# ---------------------------------------------------------------------------------------------- reading results


def find_results(root: Path) -> list[dict[str, Any]]:
    """Every complete ``results.json`` under ``root`` (recursively), in path order."""
    found = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if results.get("complete"):
            found.append(results)
    return found


def wandb_results(project: str) -> list[dict[str, Any]]:
    """The finished runs of a W&B project (``entity/project``) rebuilt as results dicts (config + summary)."""
    import wandb  # only when asked: needs the network and a login

    results = []
    for run in wandb.Api().runs(project):
        if run.state != "finished":
            continue
        results.append(results_from_summary(dict(run.config), dict(run.summary)))
    return results


def results_from_summary(config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A results dict from a W&B run: ``pipeline.flat_summary`` wrote "<stage>/<metric>" and "size/<key>"."""
    metrics: dict[str, dict[str, float]] = {"baseline": {}, "quantized": {}}
    size: dict[str, float] = {}
    for key, value in summary.items():
        stage, _, name = key.partition("/")
        if stage in metrics and isinstance(value, int | float):
            metrics[stage][name] = float(value)
        elif stage == "size" and isinstance(value, int | float):
            size[name] = float(value)
    method = (config.get("method") or {}).get("name", "?")
    return {"config": config, "method": method, "metrics": metrics, "size": size, "complete": True}


# ------------------------------------------------------------------------------------------- rows and points


def weight_scheme(config: dict[str, Any]) -> tuple[str, str]:
    """(bits, group) labels of a run's effective weight spec: the last method step that quantizes weights."""
    steps = [s for s in (config.get("method") or {}).get("steps", []) if isinstance(s, dict) and s.get("weight")]
    if not steps:
        return f"W{config.get('bits', '?')}", group_label(config.get("group_size"))
    step = steps[-1]
    weight = step["weight"]
    bits = f"W{weight.get('bits', config.get('bits'))}"
    if step.get("activations"):
        bits += f"A{step['activations'].get('bits')}"
    grid = weight.get("format", config.get("format", "int"))
    if grid != "int":
        bits += f" {grid}"
    if weight.get("granularity") in ("channel", "tensor"):
        return bits, weight["granularity"]
    return bits, group_label(weight.get("group_size", config.get("group_size")))


def group_label(group_size: Any) -> str:
    return "channel" if group_size in (None, "None", "null") else f"g{group_size}"


def points_of(results: dict[str, Any], bpw_key: str) -> list[Point]:
    """The quantized run's points and its full-precision baseline's, one per metric."""
    config = results.get("config", {})
    model = str((config.get("model") or {}).get("name", "?"))
    dataset = str((config.get("data") or {}).get("name", "?"))
    bits, group = weight_scheme(config)
    quantized = Row(model, str(results.get("method", "?")), bits, group)
    dtype = str((config.get("model") or {}).get("dtype", "float16"))
    baseline = Row(model, "fp", FP_BITS.get(dtype, dtype.upper()), "-")
    bpw = (results.get("size") or {}).get(bpw_key)
    metrics = results.get("metrics") or {}
    points = [Point(quantized, column_of(name, dataset), float(value), bpw)
              for name, value in (metrics.get("quantized") or {}).items() if _is_number(value)]
    points += [Point(baseline, column_of(name, dataset), float(value), FP_BITS_PER_WEIGHT)
               for name, value in (metrics.get("baseline") or {}).items() if _is_number(value)]
    return points


def column_of(metric: str, dataset: str) -> str:
    """Perplexity is named by the dataset it was measured on; task metrics ("task/metric") by themselves."""
    return dataset if metric == "perplexity" else metric


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def collect(results: Iterable[dict[str, Any]], bpw_key: str) -> dict[tuple[Row, str], Point]:
    """The measured table: one point per (row, column); a later duplicate (a rerun) replaces an earlier one,
    except that the full-precision baseline, repeated by every run, keeps its first value."""
    table: dict[tuple[Row, str], Point] = {}
    for result in results:
        for point in points_of(result, bpw_key):
            key = (point.row, point.column)
            if point.row.method == "fp" and key in table:
                continue
            table[key] = point
    return table


# ------------------------------------------------------------------------------------------ published numbers


def read_expected(path: Path) -> dict[tuple[Row, str], float | None]:
    """``expected.csv``: model,method,bits,group,dataset,value[,source]; an empty value = not verified."""
    expected: dict[tuple[Row, str], float | None] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(line for line in handle if not line.lstrip().startswith("#"))
        missing = [c for c in EXPECTED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {', '.join(missing)}; expected {', '.join(EXPECTED_COLUMNS)}")
        for line in reader:
            row = Row(line["model"], line["method"], line["bits"], line["group"])
            value = line["value"].strip()
            expected[(row, line["dataset"])] = float(value) if value else None
    return expected


# ------------------------------------------------------------------------------------------------- the table


def sort_rows(rows: Iterable[Row]) -> list[Row]:
    """Paper order: per model (first seen), full precision first, then by bits (high to low), then method."""
    rows = list(dict.fromkeys(rows))
    models = list(dict.fromkeys(r.model for r in rows))

    def key(row: Row) -> tuple:
        method = METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else len(METHOD_ORDER)
        digits = "".join(ch for ch in row.bits.split("A")[0] if ch.isdigit())
        return (models.index(row.model), row.method != "fp", -int(digits or 0), row.group, method, row.method)

    return sorted(rows, key=key)


def sort_columns(columns: Iterable[str]) -> list[str]:
    columns = list(dict.fromkeys(columns))
    return sorted(columns, key=lambda c: (DATASET_ORDER.index(c) if c in DATASET_ORDER else len(DATASET_ORDER), c))


def build_table(measured: dict[tuple[Row, str], Point],
                expected: dict[tuple[Row, str], float | None] | None) -> tuple[list[str], list[list[str]]]:
    """Header and cells. Published rows are shown for the measured models and columns only."""
    columns = sort_columns(column for _, column in measured)
    rows = {row for row, _ in measured}
    if expected:
        models = {row.model for row in rows}
        rows |= {row for row, column in expected if row.model in models and column in columns}
    header = ["model", "method", "bits", "group"]
    for column in columns:
        header += [column, f"{column} (paper)", f"{column} Δ"] if expected is not None else [column]
    body = []
    for row in sort_rows(rows):
        cells = [row.model, row.method, row.bits, row.group]
        for column in columns:
            point = measured.get((row, column))
            value = point.value if point else None
            cells.append(fmt(value))
            if expected is not None:
                published = expected.get((row, column))
                cells += [fmt(published), fmt_diff(value, published)]
        body.append(cells)
    return header, body


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if abs(value) >= 1000 else f"{value:.2f}"


def fmt_diff(measured: float | None, published: float | None) -> str:
    if measured is None or published is None:
        return ""
    diff = measured - published
    return f"{diff:+.3g}" if abs(diff) >= 1000 else f"{diff:+.2f}"


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    numeric = [i >= 4 for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def to_csv(header: list[str], body: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- Pareto plot


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and perplexity, by increasing size."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(measured: dict[tuple[Row, str], Point], path: Path, bpw: str = "linear") -> Path:
    """Perplexity against bits per weight, one panel per (model, dataset); the Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(p.row.model, p.column) for p in measured.values() if p.column in dataset_columns(measured)})
    if not panels:
        raise ValueError("no perplexity to plot")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    styles = method_styles({p.row.method for p in measured.values()})
    for ax, (model, dataset) in zip(axes.flat, panels, strict=False):
        draw_panel(ax, [p for p in measured.values() if p.row.model == model and p.column == dataset], bpw, styles)
        ax.set_title(f"{model} · {dataset}", fontsize=10)
        ax.set_ylabel(f"perplexity on {dataset} (lower is better)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    figure.suptitle("Perplexity vs. bits per weight (dashed: Pareto front)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def dataset_columns(measured: dict[tuple[Row, str], Point]) -> set[str]:
    """Columns that hold perplexity (a dataset's name), not another metric ("task/metric")."""
    return {column for (_, column) in measured if "/" not in column}


def method_styles(methods: Iterable[str]) -> dict[str, dict[str, str]]:
    """One marker and colour per method, the same in every panel."""
    markers = "osD^vP*Xhp<>"
    return {method: {"marker": markers[i % len(markers)], "color": f"C{i % 10}"}
            for i, method in enumerate(sorted(methods, key=method_rank))}


def draw_panel(ax: Any, points: list[Point], bpw: str, styles: dict[str, dict[str, str]]) -> None:
    xy = [(p.bits_per_weight, p.value) for p in points if p.bits_per_weight is not None]
    for method in sorted({p.row.method for p in points}, key=method_rank):
        mine = [p for p in points if p.row.method == method and p.bits_per_weight is not None]
        ax.scatter([p.bits_per_weight for p in mine], [p.value for p in mine], s=45, label=method, zorder=3,
                   **styles[method])
        for p in mine:
            label = p.row.bits if p.row.group in ("-", "channel") else f"{p.row.bits} {p.row.group}"
            ax.annotate(label, (p.bits_per_weight, p.value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(xy)
    if len(front) > 1:
        ax.step([x for x, _ in front], [y for _, y in front], where="post", linestyle="--", color="grey",
                linewidth=1, label="Pareto front", zorder=2)
    values = [y for _, y in xy]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(BPW_LABELS[bpw], fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", type=Path, help="a sweep directory (results.json files, any depth)")
    parser.add_argument("--wandb-project", help="also read the finished runs of this W&B project (entity/project)")
    parser.add_argument("--expected", type=Path, help="published numbers: experiments/<paper>/expected.csv")
    parser.add_argument("--csv", type=Path, help="also write the CSV table here")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    parser.add_argument("--png", type=Path, help="Pareto plot (default: <sweep>/pareto.png, or ./pareto.png)")
    parser.add_argument("--bpw", choices=tuple(BPW_KEYS), default="linear",
                        help="x axis: bits per weight of the quantized Linears (default) or of the whole model")
    args = parser.parse_args(argv)
    if args.sweep is None and not args.wandb_project:
        parser.error("give a sweep directory, --wandb-project, or both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = find_results(args.sweep) if args.sweep is not None else []
    if args.wandb_project:
        results += wandb_results(args.wandb_project)
    if not results:
        print(f"error: no complete {RESULTS_FILE} under {args.sweep or args.wandb_project}", file=sys.stderr)
        return 1
    measured = collect(results, BPW_KEYS[args.bpw])
    expected = read_expected(args.expected) if args.expected else None
    header, body = build_table(measured, expected)
    markdown, table_csv = to_markdown(header, body), to_csv(header, body)
    print(markdown, end="\n\n")
    print(table_csv, end="")
    if args.markdown:
        args.markdown.write_text(markdown + "\n")
    if args.csv:
        args.csv.write_text(table_csv)
    png = args.png or ((args.sweep or Path(".")) / "pareto.png")
    print(f"\nPareto plot: {plot_pareto(measured, png, args.bpw)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
