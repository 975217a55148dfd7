"""scripts/make_table.py on a fake sweep: the paper-layout table (Markdown, CSV) with published values and
differences, and the Pareto plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import load_make_table

ROOT = Path(__file__).resolve().parent.parent


make_table = load_make_table()


def weight_step(name: str, bits: int, group_size: int | None, symmetric: bool = False) -> dict[str, Any]:
    granularity = "channel" if group_size is None else "group"
    return {"name": name, "weight": {"bits": bits, "symmetric": symmetric, "granularity": granularity,
                                     "group_size": group_size}}


W8A8 = {"name": "rtn", "weight": {"bits": 8, "symmetric": True, "granularity": "channel"},
        "activations": {"bits": 8, "symmetric": True, "granularity": "token"}}


def write_run(folder: Path, model: str, method: str, steps: list[dict], dataset: str, baseline: float,
              quantized: float, bpw: float, complete: bool = True, bits: int = 4) -> None:
    results = {
        "config": {"model": {"name": model, "dtype": "float16"}, "data": {"name": dataset}, "bits": bits,
                   "group_size": None, "method": {"name": method, "steps": steps}},
        "method": method,
        "metrics": {"baseline": {"perplexity": baseline}, "quantized": {"perplexity": quantized}},
        "size": {"fp16_mb": 250.0, "quantized_mb": 80.0, "bits_per_weight": bpw + 2, "linear_bits_per_weight": bpw},
        "timings_s": {}, "layers": {}, "complete": complete,
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "gptq_table3"
    opt = "facebook/opt-125m"
    write_run(root / opt / "rtn-w4-gNone-wikitext2", opt, "rtn", [weight_step("rtn", 4, None)], "wikitext2",
              27.66, 37.50, 4.13)
    write_run(root / opt / "gptq-w4-gNone-wikitext2", opt, "gptq", [weight_step("gptq", 4, None)], "wikitext2",
              27.66, 31.00, 4.13)
    write_run(root / opt / "gptq-w3-gNone-wikitext2" / "data.n_samples=4", opt, "gptq",
              [weight_step("gptq", 3, None)], "wikitext2", 27.66, 55.00, 3.13)
    write_run(root / opt / "gptq-w4-gNone-c4", opt, "gptq", [weight_step("gptq", 4, None)], "c4", 26.56, 29.00,
              4.13)
    write_run(root / opt / "awq-w4-g128-c4", opt, "awq",
              [weight_step("awq", 4, 128), weight_step("rtn", 4, 128)], "c4", 26.56, 28.00, 4.25)
    write_run(root / opt / "rtn_w8a8-w8-gNone-c4", opt, "rtn_w8a8", [W8A8], "c4", 26.56, 26.90, 8.0, bits=8)
    write_run(root / opt / "gptq-w2-gNone-c4", opt, "gptq", [weight_step("gptq", 2, None)], "c4", 26.56, 999.0,
              2.1, complete=False)  # an interrupted run: ignored
    return root


@pytest.fixture
def expected(tmp_path: Path) -> Path:
    path = tmp_path / "expected.csv"
    path.write_text(
        "model,method,bits,group,dataset,value,source\n"
        "facebook/opt-125m,fp,FP16,-,wikitext2,27.65,Table 3\n"
        "facebook/opt-125m,rtn,W4,channel,wikitext2,37.28,Table 3\n"
        "facebook/opt-125m,gptq,W4,channel,wikitext2,31.12,Table 3\n"
        "facebook/opt-125m,gptq,W3,channel,wikitext2,53.85,Table 3\n"
        "facebook/opt-125m,rtn,W3,channel,wikitext2,1.3e3,Table 3\n"
        "facebook/opt-125m,gptq,W4,channel,c4,,not verified\n"
        "facebook/opt-350m,gptq,W4,channel,wikitext2,24.24,Table 3\n"
    )
    return path


def parse_csv(text: str) -> dict[tuple[str, ...], dict[str, str]]:
    return {(r["model"], r["method"], r["bits"], r["group"]): r for r in csv.DictReader(io.StringIO(text))}


def test_table_has_measured_published_and_difference(sweep, expected, tmp_path, capsys):
    out_csv, out_md, png = tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "plots" / "pareto.png"
    assert make_table.main([str(sweep), "--expected", str(expected), "--csv", str(out_csv),
                            "--markdown", str(out_md), "--png", str(png)]) == 0
    table = parse_csv(out_csv.read_text())
    opt = "facebook/opt-125m"
    gptq4 = table[(opt, "gptq", "W4", "channel")]
    assert (gptq4["wikitext2"], gptq4["wikitext2 (paper)"], gptq4["wikitext2 Δ"]) == ("31.00", "31.12", "-0.12")
    assert (gptq4["c4"], gptq4["c4 (paper)"], gptq4["c4 Δ"]) == ("29.00", "", "")  # blank = not verified
    fp = table[(opt, "fp", "FP16", "-")]
    assert (fp["wikitext2"], fp["wikitext2 (paper)"], fp["wikitext2 Δ"], fp["c4"]) == ("27.66", "27.65", "+0.01",
                                                                                      "26.56")
    assert table[(opt, "rtn", "W3", "channel")]["wikitext2 (paper)"] == "1.3e+03"  # published only: still shown
    assert table[(opt, "rtn", "W3", "channel")]["wikitext2"] == ""
    assert table[(opt, "awq", "W4", "g128")]["c4"] == "28.00"
    assert table[(opt, "rtn_w8a8", "W8A8", "channel")]["c4"] == "26.90"  # scheme read from the steps, not `bits`
    assert not any(row[0] == "facebook/opt-350m" for row in table)  # models not run are left out
    assert not any(row[2] == "W2" for row in table)  # the incomplete run is ignored
    assert list(table)[0] == (opt, "fp", "FP16", "-")  # paper order: full precision first

    markdown = out_md.read_text()
    assert markdown.splitlines()[0] == ("| model | method | bits | group | wikitext2 | wikitext2 (paper) | wikitext2 Δ"
                                        " | c4 | c4 (paper) | c4 Δ |")
    assert "| facebook/opt-125m | gptq | W4 | channel | 31.00 | 31.12 | -0.12 | 29.00 |  |  |" in markdown
    printed = capsys.readouterr().out
    assert markdown.strip() in printed and out_csv.read_text().strip() in printed

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_without_expected_there_are_only_measured_columns(sweep, capsys):
    assert make_table.main([str(sweep)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| model | method | bits | group | wikitext2 | c4 |"
    assert (sweep / "pareto.png").is_file()  # default place: inside the sweep


def test_no_results_is_an_error(tmp_path, capsys):
    assert make_table.main([str(tmp_path)]) == 1
    assert "no complete results.json" in capsys.readouterr().err


def test_wandb_summary_becomes_a_results_dict():
    config = {"model": {"name": "m", "dtype": "float32"}, "data": {"name": "pydoc"},
              "method": {"name": "gptq", "steps": [weight_step("gptq", 3, 64, symmetric=True)]}}
    summary = {"baseline/perplexity": 10.0, "quantized/perplexity": 12.5, "size/linear_bits_per_weight": 3.5,
               "time/calibrate": 4.0, "_runtime": 7}
    results = make_table.results_from_summary(config, summary)
    points = {(p.row, p.column): p for p in make_table.points_of(results, "linear_bits_per_weight")}
    quantized = points[(make_table.Row("m", "gptq", "W3", "g64"), "pydoc")]
    assert (quantized.value, quantized.bits_per_weight) == (12.5, 3.5)
    assert points[(make_table.Row("m", "fp", "FP32", "-"), "pydoc")].value == 10.0


def test_pareto_front_keeps_only_undominated_points():
    points = [(4.1, 31.0), (3.1, 55.0), (4.1, 37.5), (8.0, 26.9), (4.25, 33.0), (16.0, 27.6)]
    assert make_table.pareto_front(points) == [(3.1, 55.0), (4.1, 31.0), (8.0, 26.9)]
