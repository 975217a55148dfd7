"""ptq's entry point: ``python run.py [group=option ...] [key=value ...]`` (see configs/config.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ptq import distributed
from ptq.config import ConfigError, preflight, register_configs

register_configs()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """One run; returns what an Optuna sweep minimises: perplexity (language models) or −accuracy (classifiers)."""
    from ptq.pipeline import run

    if HydraConfig.get().mode == RunMode.MULTIRUN and cfg.logger.group is None:
        cfg.logger.group = cfg.sweep_name  # a sweep's runs form one W&B group
    distributed.init_from_env()  # torchrun: one rank of a data-parallel calibration (ptq.distributed)
    try:
        results = distributed.fail_fast(lambda: run(cfg, Path(HydraConfig.get().runtime.output_dir)), (ConfigError,))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    quantized = results["metrics"]["quantized"]
    return float(quantized.get("perplexity", -quantized.get("accuracy", 0.0)))


if __name__ == "__main__":
    try:
        preflight(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
