"""``python -m feedsr.train [overrides]``: a thin Hydra wrapper over ``feedsr.train.trainer.run``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from feedsr.train.config import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# TorchRec and FBGEMM warn at import and on every trace about things users cannot act on.
warnings.filterwarnings("ignore", message="is_fx_tracing will return true")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="fbgemm_gpu")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from feedsr.train.trainer import run

    try:
        run(cfg)
    except ConfigError as e:
        sys.exit(f"feedsr: {e}")


if __name__ == "__main__":
    main()
