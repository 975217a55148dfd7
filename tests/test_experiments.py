"""Every experiment config composes, over its whole sweep, into the protocol its README states.

The protocol of each experiment (models, data, calibration and evaluation sizes, the table's rows) is written once,
as data, in ``PROTOCOLS`` below; the READMEs in ``experiments/<paper>/`` state the same. A sweep is expanded the
way Hydra's basic sweeper does it; to stay fast, every combination of the keys that pick a table row (method,
bits, cell) is composed, and every value of the other keys (model, dataset) once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from conftest import load_make_table
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ptq.config import CONFIG_DIR, register_configs

ROOT = CONFIG_DIR.parent
EXPERIMENTS = CONFIG_DIR / "experiment"
ROW_KEYS = ("method", "bits", "experiment/cells")
PARTS = {"common/sweep_dirs", "cells/gptq_r"}  # included by other configs, not run by themselves


make_table = load_make_table()

OPT = frozenset({"facebook/opt-125m", "facebook/opt-350m", "facebook/opt-1.3b"})
GPTQ_ROWS = frozenset({("rtn", "W4", "channel", False), ("gptq", "W4", "channel", False),
                       ("rtn", "W3", "channel", False), ("gptq", "W3", "channel", False)})
QUAROT_METHODS = ("rtn_w4a4kv4", "smoothquant_w4a4kv4", "quarot_rtn", "quarot_gptq", "spinquant_gptq")
QUAROT_ROWS = frozenset((method, "W4A4", "channel", True) for method in QUAROT_METHODS)
QUAROT_SMOLLM2_ROWS = QUAROT_ROWS | {("quarot_gptq_w4a8", "W4A8", "channel", True)}
W8A8_ROWS = frozenset({("rtn_w8a8", "W8A8", "channel", True), ("smoothquant", "W8A8", "channel", True)})


@dataclass(frozen=True)
class Protocol:
    readme: str  # experiments/<paper>/README.md: must name the experiment
    models: frozenset[str]
    datasets: frozenset[str]
    n_samples: int  # calibration windows
    seq_len: int  # calibration window length
    eval_seq_len: int
    max_windows: int | None
    rows: frozenset[tuple[str, str, str, bool]]  # (method, bits, group, symmetric) of the weight quantizer
    sweep_name: str
    dtype: str = "float16"
    alpha: float | None = None  # SmoothQuant's migration strength, where the table fixes it
    expected: str | None = None  # experiments/<paper>/expected.csv


def smoothquant(model: str, alpha: float) -> Protocol:
    return Protocol("smoothquant", frozenset({model}), frozenset({"wikitext2"}), 512, 512, 2048, 40, W8A8_ROWS,
                    "smoothquant_w8a8", "bfloat16", alpha, "smoothquant")


PROTOCOLS: dict[str, Protocol] = {
    "gptq/opt_table3": Protocol("gptq", OPT, frozenset({"wikitext2", "ptb", "c4"}), 128, 2048, 2048, 256,
                                GPTQ_ROWS, "gptq_table3", expected="gptq"),
    "gptq/opt125m_table3": Protocol("gptq", frozenset({"facebook/opt-125m"}), frozenset({"wikitext2", "ptb", "c4"}),
                                    128, 2048, 2048, 256, GPTQ_ROWS, "gptq_table3", expected="gptq"),
    "gptq/bloom560m_table4": Protocol("gptq", frozenset({"bigscience/bloom-560m"}),
                                      frozenset({"wikitext2", "ptb", "c4"}), 128, 2048, 2048, 256, GPTQ_ROWS,
                                      "gptq_table4", expected="gptq"),
    "gptq/llama_table": Protocol(
        "gptq", frozenset({"huggyllama/llama-7b", "huggyllama/llama-13b"}), frozenset({"wikitext2"}), 128, 2048,
        2048, None,
        frozenset({("rtn", "W4", "channel", False), ("gptq_r", "W4", "channel", False), ("rtn", "W3", "channel", False),
                   ("gptq_r", "W3", "channel", False), ("gptq_r", "W3", "g128", False)}),
        "gptq_llama", expected="gptq"),
    "awq/table4": Protocol(
        "awq", frozenset({"meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "huggyllama/llama-7b",
                          "huggyllama/llama-13b"}),
        frozenset({"wikitext2"}), 128, 512, 2048, None,
        frozenset((method, f"W{bits}", "g128", False)
                  for method in ("rtn", "gptq", "gptq_r", "awq") for bits in (3, 4)),
        "awq_table4", expected="awq"),
    "smoothquant/llama2_7b": smoothquant("meta-llama/Llama-2-7b-hf", 0.85),
    "smoothquant/llama2_13b": smoothquant("meta-llama/Llama-2-13b-hf", 0.85),
    "smoothquant/llama3_8b": smoothquant("meta-llama/Meta-Llama-3-8B", 0.85),
    "smoothquant/mistral_7b": smoothquant("mistralai/Mistral-7B-v0.1", 0.8),
    "smollm2/table": Protocol(
        "smollm2", frozenset({"smollm2-135m"}), frozenset({"pydoc"}), 64, 512, 512, None,
        frozenset({("rtn", "W3", "g64", True), ("rtn", "W4", "g64", True), ("gptq", "W3", "g64", True),
                   ("gptq", "W4", "g64", True), ("awq", "W3", "g64", False), ("awq", "W4", "g64", False)})
        | W8A8_ROWS,
        "smollm2_table", dtype="float32", alpha=0.8),
    "formats/table": Protocol(
        "formats", frozenset({"smollm2-135m"}), frozenset({"pydoc"}), 64, 512, 512, None,
        frozenset((method, bits, group, True) for method in ("rtn", "gptq") for bits, group in (
            ("W4", "g16"), ("W4", "g32"), ("W4 mxfp4", "g32"), ("W4 nvfp4", "g16"), ("W8 fp8_e4m3", "channel"))),
        "formats_table", dtype="float32"),
    "formats/w8a8": Protocol(
        "formats", frozenset({"smollm2-135m"}), frozenset({"pydoc"}), 64, 512, 512, None,
        frozenset({("rtn_w8a8", "W8A8", "channel", True), ("fp8_dynamic", "W8A8 fp8_e4m3", "channel", True)}),
        "formats_table", dtype="float32"),
    "quarot/llama2_table1": Protocol(
        "quarot", frozenset({"meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf"}), frozenset({"wikitext2"}),
        128, 2048, 2048, None, QUAROT_ROWS, "quarot_table1", expected="quarot"),
    "quarot/smollm2": Protocol("quarot", frozenset({"smollm2-135m"}), frozenset({"pydoc"}), 64, 512, 512, None,
                               QUAROT_SMOLLM2_ROWS, "quarot_smollm2", dtype="float32"),
}

# Optuna sweeps: the key each tunes must exist in the composed method.
TUNING = {"tune/smoothquant_alpha": ("smoothquant", ["method.steps.0.alpha"]),
          "tune/awq_grid": ("awq", ["method.steps.0.grid", "method.steps.0.clip_grid"])}


@pytest.fixture(scope="module", autouse=True)
def hydra_config_dir():
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield


def experiment_file(name: str) -> DictConfig:
    return OmegaConf.load(EXPERIMENTS / f"{name}.yaml")


def sweep_params(name: str) -> dict[str, list[str]]:
    """The experiment's hydra.sweeper.params (its own and those of the experiment it extends), values expanded."""
    cfg = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    parser = OverridesParser.create()
    params = {}
    for key, value in (cfg.hydra.sweeper.params or {}).items():
        override = parser.parse_override(f"{key}={value}")
        params[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(value)]
    return params


def covering_jobs(params: dict[str, list[str]]) -> list[list[str]]:
    """Every combination of the row keys, with the first value of the others; then each other value once."""
    rows = [k for k in params if k in ROW_KEYS]
    others = [k for k in params if k not in ROW_KEYS]
    first = [f"{k}={params[k][0]}" for k in others]
    jobs = [[*first, *(f"{k}={v}" for k, v in zip(rows, combo, strict=True))]
            for combo in itertools.product(*(params[k] for k in rows))]
    base_rows = [f"{k}={params[k][0]}" for k in rows]
    for key in others:
        for value in params[key][1:]:
            jobs.append([*base_rows, *(f"{k}={value if k == key else params[k][0]}" for k in others)])
    return jobs


def weight_row(cfg: DictConfig) -> tuple[str, str, str, bool]:
    """(method, bits, group, symmetric) of the run's effective weight spec (its last weight step), as make_table."""
    container = OmegaConf.to_container(cfg, resolve=True)
    bits, group = make_table.weight_scheme(container)
    weight = [s for s in container["method"]["steps"] if s.get("weight")][-1]["weight"]
    return container["method"]["name"], bits, group, bool(weight["symmetric"])


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_experiment_sweep_composes_into_its_protocol(name):
    protocol = PROTOCOLS[name]
    models, datasets, rows = set(), set(), set()
    for job in covering_jobs(sweep_params(name)):
        cfg = compose("config", overrides=[f"+experiment={name}", *job])
        assert cfg.model.dtype == protocol.dtype, job
        assert (cfg.data.n_samples, cfg.data.seq_len) == (protocol.n_samples, protocol.seq_len), job
        assert (cfg.eval.seq_len, cfg.eval.max_windows) == (protocol.eval_seq_len, protocol.max_windows), job
        assert cfg.sweep_name == protocol.sweep_name
        models.add(cfg.model.name)
        datasets.add(cfg.data.name)
        rows.add(weight_row(cfg))
        step = cfg.method.steps[0]
        if cfg.method.name == "smoothquant" and protocol.alpha is not None:
            assert step.alpha == protocol.alpha, job
        if cfg.method.name == "gptq_r":
            assert step.act_order and step.true_sequential, job
        if cfg.method.name == "gptq":
            assert not step.act_order, job
            if protocol.sweep_name == "gptq_table3":  # the paper's runs: every linear from the fp block's inputs
                assert not step.true_sequential, job
    assert models == protocol.models
    assert datasets == protocol.datasets
    assert rows == protocol.rows


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_readme_names_the_experiment(name):
    readme = ROOT / "experiments" / PROTOCOLS[name].readme / "README.md"
    assert name in readme.read_text(), f"{readme} does not mention +experiment={name}"


@pytest.mark.parametrize("name", sorted(n for n, p in PROTOCOLS.items() if p.expected))
def test_published_rows_match_the_labels_make_table_gives(name):
    """Every quantized row of the sweep has a published cell (maybe blank) for every model and dataset."""
    protocol = PROTOCOLS[name]
    expected = make_table.read_expected(ROOT / "experiments" / protocol.expected / "expected.csv")
    for model, dataset, (method, bits, group, _) in itertools.product(protocol.models, protocol.datasets,
                                                                      protocol.rows):
        assert (make_table.Row(model, method, bits, group), dataset) in expected, (model, dataset, method, bits)


def test_every_experiment_file_is_a_table_a_tuning_sweep_or_a_part_of_one():
    files = {str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in EXPERIMENTS.rglob("*.yaml")}
    cells = set()
    for name in PROTOCOLS:
        params = experiment_file(name).get("hydra", {}).get("sweeper", {}).get("params", {}) or {}
        cells |= {f"cells/{c}" for c in str(params.get("experiment/cells", "")).split(",") if c}
    assert files == set(PROTOCOLS) | set(TUNING) | PARTS | cells


@pytest.mark.parametrize("name", sorted(TUNING))
def test_optuna_sweeps_tune_keys_of_their_method(name):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    method, keys = TUNING[name]
    cfg = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    assert cfg.method.name == method
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == set(keys)
    for key in keys:
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.parametrize(("launcher", "plugin"), [("local", "hydra_plugins.hydra_joblib_launcher"),
                                                  ("slurm", "hydra_plugins.hydra_submitit_launcher")])
def test_launcher_configs_compose_and_name_an_importable_launcher(launcher, plugin):
    pytest.importorskip(plugin)
    from hydra.utils import get_class

    cfg = compose("config", overrides=["+experiment=smollm2/table", f"hydra/launcher={launcher}"],
                  return_hydra_config=True)
    assert get_class(cfg.hydra.launcher._target_).__name__.endswith("Launcher")


def test_sweep_folders_name_the_row_and_keep_other_overrides():
    cfg = compose("config", overrides=["+experiment=smollm2/table", "experiment/cells=gptq_w3"],
                  return_hydra_config=True)
    assert cfg.hydra.sweep.subdir.startswith("smollm2-135m/gptq-w3-g64-pydoc/")
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"experiment", "experiment/cells", "model.source", "method", "bits"} <= excluded
    assert "data.n_samples" not in excluded
