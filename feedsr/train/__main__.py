"""``python -m feedsr.train [overrides]``: a thin Hydra wrapper over ``feedsr.train.trainer.run``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from feedsr.data.schema import DataError
from feedsr.quiet import quiet_libraries
from feedsr.runtime.checkpoint import CheckpointError
from feedsr.runtime.config import CONFIG_DIR, ConfigError

quiet_libraries()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Train; return the best validation score (mean AUC over ``trainer.select_tasks``), which
    the Optuna sweeper of ``hparams_search=...`` maximises. None without validation."""
    from feedsr.train.trainer import run

    try:
        result = run(cfg)
    except (ConfigError, DataError, CheckpointError) as e:  # a user's mistake: one line naming it
        sys.exit(f"feedsr: {e}")
    return result.best["score"] if result.best else None


if __name__ == "__main__":
    main()
