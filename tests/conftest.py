"""Shared fixtures: the composed Hydra config for a tiny random Llama, and an isolated output directory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ptq.config import CONFIG_DIR, register_configs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
SESSION_MODEL_CACHE = None if os.environ.get("PTQ_CACHE_DIR") else tempfile.mkdtemp(prefix="ptq-test-cache-")
if SESSION_MODEL_CACHE:  # models loaded from GGUF files are cached here for the session, not in ~/.cache/ptq
    os.environ["PTQ_CACHE_DIR"] = SESSION_MODEL_CACHE
register_configs()


@pytest.fixture(scope="session", autouse=True)
def _remove_session_model_cache():
    yield
    if SESSION_MODEL_CACHE:
        shutil.rmtree(SESSION_MODEL_CACHE, ignore_errors=True)


TINY = ["model=tiny-llama", "data.n_samples=8", "data.seq_len=64", "eval.max_windows=4", "progress=false"]


def compose_config(overrides: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"eval.cache_dir={tmp_path / 'cache'}"])


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides: str) -> DictConfig:
        logger = [] if any(o.startswith("logger=") for o in overrides) else ["logger=none"]
        return compose_config([*TINY, *logger, *overrides], tmp_path)

    return make


def load_make_table() -> Any:
    """scripts/make_table.py as a module (scripts are not a package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "make_table.py"
    spec = importlib.util.spec_from_file_location("make_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_table", module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
