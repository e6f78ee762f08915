"""``python -m feedsr.prepare [overrides]``: a thin Hydra wrapper over ``feedsr.prepare.pipeline.run``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from feedsr.prepare.config import CONFIG_DIR, PRIMARY_CONFIG, PrepareError


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=PRIMARY_CONFIG)
def main(cfg: DictConfig) -> None:
    from feedsr.prepare.pipeline import run

    try:
        run(cfg)
    except PrepareError as e:  # a user's mistake: one line naming it
        sys.exit(f"feedsr.prepare: {e}")


if __name__ == "__main__":
    main()
