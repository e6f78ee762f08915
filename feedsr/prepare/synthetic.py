"""The synthetic dataset, made like any other: ``feedsr.data.synthetic`` simulates a flat
impression log, and the pipeline (``feedsr.prepare.pipeline``) turns it into sequences with the
config below, so there is one path from a log to a dataset.

The config maps the simulated log's columns to roles: post ids, authors and the two categoricals
get vocabularies from the training window like any log's (a post first shown in valid or test is
unknown, id 0); the observed quality and the post age are per-impression numbers passed through
as ``ctx_post_quality`` / ``ctx_post_age``; ``ctx_author_affinity`` is a point-in-time feature,
log1p of the member's earlier clicks on the author; the content embedding (the post's topic
vector) becomes ``dense_content_<i>``, numbers in the post token; the true probabilities become
``true_*``. The log's ``term_*`` columns (ground truth for ``probs_without``) stay in the log.
"""

from __future__ import annotations

from pathlib import Path

from feedsr.data.output import claim
from feedsr.data.schema import TRUE_PROB_PREFIX
from feedsr.data.synthetic import ACTION_NAMES, LATENTS_FILE, Simulation, config_dict, write_log
from feedsr.prepare.config import (
    ColumnsConfig,
    EngineConfig,
    FeatureConfig,
    PrepareConfig,
    SplitsConfig,
    TimeConfig,
)
from feedsr.prepare.pipeline import run


def prepare_config(sim: Simulation, out: Path, max_seq_len: int) -> PrepareConfig:
    """The pipeline config of a simulated log (``feedsr.data.synthetic.write_log``)."""
    bounds = [split.start for split in sim.splits] + [sim.splits[-1].end]
    columns = ColumnsConfig(
        member="member_id", item="post_id", timestamp="timestamp", author="author_id", position="position",
        actions={a: a for a in ACTION_NAMES},
        categoricals={"post_type": "post_type", "surface": "surface"},
        numeric={"post_quality": "post_quality", "post_age": "post_age"},
        dense={c: c for c in sim.config.content_columns},
        true_probs={a: TRUE_PROB_PREFIX + a for a in ACTION_NAMES},
    )
    affinity = FeatureConfig(name="author_affinity", kind="action_count", keys=["member", "author"],
                             action="click", log1p=True)
    return PrepareConfig(
        name="synthetic", logs=[str(sim.log_path)], out=str(out), columns=columns,
        time=TimeConfig(unit="s", timezone="UTC"), features=[affinity],
        splits=SplitsConfig(names=[s.name for s in sim.splits], boundaries=[str(b) for b in bounds]),
        max_seq_len=max_seq_len, engine=EngineConfig(memory_limit="2GB"),
    )


def generate(out_dir: str | Path, num_members: int, seed: int, max_seq_len: int = 256, **params) -> dict:
    """Simulate a log into ``out_dir`` (``impressions.parquet``, ``latents.npz``), prepare it into
    the dataset there (``dataset.json``, ``vocab.json``, the splits) and return its metadata.
    ``params`` are ``feedsr.data.synthetic.SyntheticConfig`` fields. The same arguments always
    give the same tables."""
    out = claim(out_dir)  # never over a user's files
    sim = write_log(out, num_members, seed, **params)
    extra = {"num_members": num_members, "seed": seed, "config": config_dict(sim.config), "latents": LATENTS_FILE}
    return run(prepare_config(sim, out, max_seq_len), extra_meta=extra)
