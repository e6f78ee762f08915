"""The end-of-run plot of HDET's learning rates: every rank's and the base, per param group."""

from __future__ import annotations

import json
from pathlib import Path


def plot_learning_rates(train_log: Path, out: Path) -> Path | None:
    """Draw ``rank_lrs`` and ``base_lrs`` from a run's train_log.jsonl into a PNG; None if absent."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(train_log).read_text().splitlines()]
    records = [r for r in records if "rank_lrs" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    groups = list(records[0]["rank_lrs"])
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.6 * len(groups)), sharex=True, squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        per_rank = list(zip(*[r["rank_lrs"][group] for r in records]))
        for rank, values in enumerate(per_rank):
            ax.plot(steps, values, lw=0.8, alpha=0.7, label=f"rank {rank}")
        ax.plot(steps, [r["base_lrs"][group] for r in records], color="black", lw=1.5, label="base")
        ax.set_ylabel(f"lr: {group}")
        ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7, ncol=min(len(per_rank) + 1, 5))
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
