#!/usr/bin/env python
"""Where a training step's time goes: the PyTorch profiler over real trainer steps.

    python scripts/profile_train.py [--steps 10] [--threads 2] [--top 25] [--json out.json] \
        [--trace trace.json] [HYDRA_OVERRIDES ...]

Builds the real ``Trainer`` from the Hydra overrides (default: the synthetic data config and the
default model), runs 3 warm-up steps, then profiles ``--steps`` full training steps (forward, loss,
backward with the fused sparse update, AdamW). Prints the wall time per step, the operators with
the most self CPU time (share of the profiled time, calls per step) and a coarse breakdown by
category; ``--trace`` writes a Chrome trace for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ATEN_CATEGORIES = {  # aten operator (without "aten::") -> category
    "matmul / linear": {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm"},
    "attention": {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                  "scaled_dot_product_attention", "_softmax", "_softmax_backward_data"},
    "elementwise / norms / activations": {
        "add", "add_", "mul", "mul_", "sub", "div", "div_", "gelu", "gelu_backward", "native_layer_norm",
        "native_layer_norm_backward", "exp", "sigmoid", "sigmoid_backward", "where", "neg", "rsqrt", "pow",
        "bernoulli_", "clamp", "clamp_min", "log", "log1p", "sum", "mean", "cos", "sin", "threshold_backward",
        "addcmul_", "addcdiv_", "lerp_", "sqrt", "maximum", "minimum", "binary_cross_entropy_with_logits",
        "sigmoid_", "abs", "_foreach_add_", "_foreach_mul_", "_foreach_lerp_", "_foreach_addcmul_",
        "_foreach_addcdiv_", "_foreach_sqrt", "_foreach_div_", "_foreach_norm", "linalg_vector_norm", "eq",
        "lt", "ge", "gt", "le", "ne", "logical_and", "logical_or", "bitwise_and", "isfinite", "any", "all"},
    "copies / indexing / fills": {
        "copy_", "cat", "index", "index_put_", "_index_put_impl_", "gather", "scatter", "scatter_add_",
        "masked_fill_", "masked_select", "nonzero", "empty", "empty_strided", "zero_", "fill_", "clone",
        "contiguous", "to", "_to_copy", "stack", "repeat", "repeat_interleave", "cumsum", "arange",
        "zeros", "ones", "full", "new_zeros", "new_empty", "index_select", "embedding", "_local_scalar_dense",
        "item", "resize_", "flip", "sort", "argsort", "unique", "constant_pad_nd", "tril", "triu"},
}
OTHER_CATEGORIES = {  # fragments of non-aten names -> category
    "embeddings (TorchRec / FBGEMM)": ("fbgemm", "lookup", "embedding", "jagged", "keyed"),
    "optimizer": ("optimizer.step", "adamw", "adam."),
    "collectives": ("c10d", "gloo", "allreduce", "barrier"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", type=Path)
    p.add_argument("--trace", type=Path)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def category(name: str) -> str:
    if name.startswith("aten::"):
        op = name[len("aten::"):]
        for cat, ops in ATEN_CATEGORIES.items():
            if op in ops:
                return cat
        return "shape / view ops" if op in SHAPE_OPS else "other aten"
    lowered = name.lower()
    for cat, fragments in OTHER_CATEGORIES.items():
        if any(f in lowered for f in fragments):
            return cat
    return "autograd / module overhead (self time)"


SHAPE_OPS = {"view", "reshape", "permute", "transpose", "t", "expand", "as_strided", "select", "slice",
             "split", "split_with_sizes", "narrow", "unbind", "unsqueeze", "squeeze", "flatten", "_unsafe_view",
             "chunk", "detach", "alias", "view_as", "expand_as", "unflatten", "numpy_T", "lift_fresh",
             "_reshape_alias", "indices", "values", "result_type", "is_nonzero", "size", "stride"}


def main(argv=None):
    from feedsr.quiet import quiet_libraries
    from feedsr.train.trainer import sampled_trainer

    quiet_libraries()
    args = parse_args(argv)
    overrides = ["data.num_workers=0", "run_id=profile_train", "output_root=/tmp/feedsr_profile",
                 "trainer.tensorboard=false", "trainer.progress=false", *args.overrides]
    if args.threads:
        overrides.append(f"trainer.num_threads={args.threads}")
    with sampled_trainer(overrides, args.steps + 3) as (trainer, sample):
        for batch in sample[:3]:
            trainer.train_step(batch)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for batch in sample[3:]:
                trainer.train_step(batch)
        seconds = time.perf_counter() - start
    imps = sum(int(b.lengths.sum()) for b in sample[3:])
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"{args.steps} steps, {seconds / args.steps * 1e3:.1f} ms/step under the profiler, "
          f"{imps / seconds:,.0f} impressions/s, {torch.get_num_threads()} threads, "
          f"{len(events)} distinct ops, {sum(e.count for e in events) / args.steps:,.0f} op calls/step")
    print(f"{'operator':52s} {'self %':>7s} {'ms/step':>8s} {'calls/step':>10s}")
    for e in events[:args.top]:
        print(f"{e.key[:52]:52s} {100 * e.self_cpu_time_total / total:6.1f}% "
              f"{e.self_cpu_time_total / 1e3 / args.steps:8.2f} {e.count / args.steps:10.0f}")
    by_cat = defaultdict(float)
    calls = defaultdict(float)
    for e in events:
        by_cat[category(e.key)] += e.self_cpu_time_total
        calls[category(e.key)] += e.count
    print(f"\n{'category':36s} {'self %':>7s} {'calls/step':>10s}")
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"{cat:36s} {100 * t / total:6.1f}% {calls[cat] / args.steps:10.0f}")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    if args.json:
        args.json.write_text(json.dumps({
            "overrides": args.overrides, "steps": args.steps, "ms_per_step": seconds / args.steps * 1e3,
            "impressions_per_s": imps / seconds, "threads": torch.get_num_threads(),
            "categories": {c: t / total for c, t in by_cat.items()},
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / args.steps}
                    for e in events[:args.top]],
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
