"""Where a run's numbers go: ``results.json`` in the Hydra run directory, always; W&B unless ``logger=none``.

W&B runs offline unless the user asks for ``logger.mode=online`` (``wandb sync`` uploads an offline run later).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically, so a killed run never leaves a complete-looking file."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_jsonable))
    os.replace(tmp, path)
    return path


def completed_results(output_dir: Path) -> dict[str, Any] | None:
    """The results of an earlier, finished run in ``output_dir`` (a restarted sweep skips it), else None."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return results if results.get("complete") else None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Tracker:
    """A thin W&B wrapper that does nothing when disabled."""

    def __init__(self, logger_cfg: dict[str, Any], config: dict[str, Any], output_dir: Path, name: str) -> None:
        self.run = None
        if logger_cfg["name"] == "none" or logger_cfg["mode"] == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=logger_cfg["project"], entity=logger_cfg.get("entity"),
                              mode=logger_cfg["mode"], dir=str(output_dir), config=config, name=name,
                              group=logger_cfg.get("group"), tags=list(logger_cfg.get("tags") or []),
                              reinit="finish_previous")

    @property
    def directory(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log_layers(self, layers: dict[str, dict[str, Any]]) -> None:
        if self.run is None or not layers:
            return
        import wandb

        columns = ["layer", *next(iter(layers.values())).keys()]
        table = wandb.Table(columns=columns, data=[[name, *row.values()] for name, row in layers.items()])
        self.run.log({"layers": table})

    def log_images(self, images: dict[str, Path]) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path)) for key, path in images.items()})

    def log_curve(self, key: str, values: list[float]) -> None:
        """A per-iteration curve (e.g. ``rotation/loss``) as a W&B line chart over its own ``<key>_iteration``."""
        if self.run is None:
            return
        self.run.define_metric(key, step_metric=f"{key}_iteration")
        for iteration, value in enumerate(values, start=1):
            self.run.log({key: value, f"{key}_iteration": iteration})

    def finish(self, summary: dict[str, Any], results_path: Path) -> None:
        if self.run is None:
            return
        import wandb

        self.run.summary.update(summary)
        artifact = wandb.Artifact(f"results-{self.run.id}", type="results")
        artifact.add_file(str(results_path))
        self.run.log_artifact(artifact)
        self.run.finish()
