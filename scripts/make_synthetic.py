"""Generate a synthetic feedsr dataset and print what it holds.

    python scripts/make_synthetic.py --out data/synthetic --num-members 20000 --seed 0
    python scripts/make_synthetic.py --data synthetic_bench    # a data config's generate: and path

Prints the rows and targets of each split, the base rate of each action on each split's targets,
the wall time, and the oracle AUC (the true probability scored against the labels) per action on
the test split: the ceiling a model trained on this data can reach. Beside it, the oracle with
each history effect taken out (``feedsr.data.synthetic.probs_without``) and with all of them (the
no-history oracle): what a model loses by missing that effect.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import OmegaConf

from feedsr.data.schema import TRUE_PROB_PREFIX
from feedsr.data.synthetic import (
    ACTION_NAMES,
    HISTORY_TERMS,
    LOG_FILE,
    TERM_PREFIX,
    SyntheticConfig,
    load_targets,
    probs_without,
)
from feedsr.prepare.synthetic import generate
from feedsr.data.tasks import decode_actions
from feedsr.data.vocab import VOCAB_SIZES
from feedsr.eval.metrics import roc_auc


def summarize(out_dir: str, meta: dict) -> None:
    header = "".join(f"{a:>11}" for a in ACTION_NAMES)
    print(f"{'split':<6}{'rows':>8}{'members':>9}{'targets':>10}   base rate:{header}")
    for name, counts in meta["splits"].items():
        rates = ""
        if counts["rows"]:  # a split can be empty with very few members, and then has no file
            bits = load_targets(out_dir, name, ["action_bits"])["action_bits"]
            labels = decode_actions(bits, len(ACTION_NAMES))
            rates = "".join(f"{r:>11.4f}" for r in labels.mean(axis=0))
        print(
            f"{name:<6}{counts['rows']:>8}{counts['members']:>9}{counts['targets']:>10}"
            f"{'':>13}{rates}"
        )
    if not meta["splits"]["test"]["rows"]:
        return
    columns = ["action_bits"] + [TRUE_PROB_PREFIX + a for a in ACTION_NAMES]
    test = load_targets(out_dir, "test", columns)
    labels = decode_actions(test["action_bits"], len(ACTION_NAMES))
    print(f"{'test: oracle AUC':<46}" + "".join(
        f"{roc_auc(test[TRUE_PROB_PREFIX + a], labels[:, i]):>11.4f}"
        for i, a in enumerate(ACTION_NAMES)
    ))
    print(f"{'test: mean true prob':<46}" + "".join(
        f"{test[TRUE_PROB_PREFIX + a].mean():>11.4f}" for a in ACTION_NAMES
    ))
    print_ablations(out_dir, meta)


def oracle_aucs_without(out_dir: str, meta: dict, split: str = "test") -> dict[str, dict[str, float]]:
    """A split's oracle AUC per action: in full ("full"), with each history term taken out
    ("no <term>"), and with all of them ("no history")."""
    cfg = SyntheticConfig(**meta["config"])
    bounds = meta["splits"][split]
    columns = ["timestamp", "position", *ACTION_NAMES,
               *(TRUE_PROB_PREFIX + a for a in ACTION_NAMES), *(TERM_PREFIX + t for t in HISTORY_TERMS)]
    table = pq.read_table(Path(out_dir, LOG_FILE), columns=columns)
    t = table["timestamp"].to_numpy()
    inside = (t >= bounds["start"]) & (t < bounds["end"])
    log = {c: table[c].to_numpy()[inside] for c in columns}
    out = {}
    for label, terms in [("full", []), *((f"no {t}", [t]) for t in HISTORY_TERMS), ("no history", HISTORY_TERMS)]:
        probs = probs_without(log, cfg, terms)
        out[label] = {a: roc_auc(probs[:, i], log[a].astype(bool)) for i, a in enumerate(ACTION_NAMES)}
    return out


def print_ablations(out_dir: str, meta: dict) -> None:
    """The test split's oracle AUC with each history term, then all of them, taken out."""
    for label, aucs in oracle_aucs_without(out_dir, meta).items():
        if label != "full":
            print(f"{'test: oracle AUC, ' + label:<46}" + "".join(f"{aucs[a]:>11.4f}" for a in ACTION_NAMES))


def data_config_defaults(name: str) -> dict:
    """--out, --num-members, --seed, --max-seq-len and the generator parameters from a data
    config (a name under feedsr/conf/data, or a YAML path) with a ``generate:`` section."""
    path = Path(name)
    if not name.endswith(".yaml"):
        path = Path(__file__).parents[1] / "feedsr/conf/data" / f"{name}.yaml"
    data = OmegaConf.to_container(OmegaConf.load(path))
    if not data.get("generate"):
        raise ValueError(f"{path} has no generate: section")
    params = dict(data["generate"])
    return {"out": data["path"], "num_members": params.pop("num_members"), "seed": params.pop("seed", 0),
            "max_seq_len": data.get("max_seq_len", 256), "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a data config with a generate: section (e.g. synthetic_bench); "
                                       "the other flags override it")
    parser.add_argument("--out", help="dataset directory to write")
    parser.add_argument("--num-members", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-seq-len", type=int)
    args = parser.parse_args()
    try:
        defaults = {"seed": 0, "max_seq_len": 256, "params": {}}
        if args.data:
            defaults = data_config_defaults(args.data)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    for name in ("out", "num_members", "seed", "max_seq_len"):
        if getattr(args, name) is None:
            setattr(args, name, defaults.get(name))
    if args.out is None or args.num_members is None:
        parser.error("--out and --num-members are required without --data")
    start = time.perf_counter()
    try:
        meta = generate(args.out, args.num_members, args.seed, args.max_seq_len, **defaults["params"])
    except ValueError as e:
        parser.error(str(e))
    elapsed = time.perf_counter() - start
    sizes = meta[VOCAB_SIZES]
    print(
        f"wrote {args.out}: {meta['num_members']} members, {sizes['item_ids']} post ids and "
        f"{sizes['author_ids']} author ids (those seen in training + unknown) in {elapsed:.1f}s"
    )
    summarize(args.out, meta)


if __name__ == "__main__":
    main()
