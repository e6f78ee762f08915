#!/usr/bin/env python
"""Training throughput of Feed-SR against the machine's matmul peak and a plain PyTorch reference.

    python scripts/bench_train.py [--sizes tiny default large] [--steps 20] [--json out.json]

For each model size, on real bucketed training batches of the synthetic data (one process, all
cores, fp32 on CPU):

- steady-state training throughput (impressions/s, tokens/s = 2 per impression) of the full
  trainer step (DMP, fused sparse update, AdamW), after 3 warm-up steps;
- model FLOPs per step, counted analytically on real (unpadded) tokens, training = 3 x forward:
    per layer and token: 6 d^2 (q, k, v projections)
    per layer and token, except the last layer: 2 d^2 + 4 d f (output projection, FFN)
    per layer and row of S = 2L tokens: 4 d S (S + 1) / 2 (causal QK^T and AV)
    per impression: 2 d^2 + 4 d f (the last layer's output projection and FFN, post tokens only)
      + 2 M d (action token) [+ 2 D_in d input projection] + the head
    (MMoE: experts 2 in h, gates 2 in G E, towers 2 h t + 2 t per task);
- achieved FLOP/s as a share of the dense matmul peak measured in the same run (torch.mm on
  2048 x 2048 fp32, same threads);
- two ceilings at the model's own shapes, each as a share of that peak: its linear layers alone
  (GEMM-shape) and causal SDPA alone (forward + backward at the median batch's shape);
- the same figures for a reference built from ``torch.nn.TransformerEncoder`` (pre-LN, same width,
  heads, FFN, layers) on the same padded sequences (causal + padding masks) with a linear head and
  AdamW, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": ["model.embedding_dim=8", "model.num_layers=1", "model.ffn_dim=64"],
    "default": [],
    "large": ["model.embedding_dim=32", "model.num_layers=4", "model.num_heads=4", "model.ffn_dim=512"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--data", type=Path, default=REPO / "data/synthetic")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the dense blocks (trainer.compile)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; 10 with --compile)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Dense fp32 matmul FLOP/s with the current thread count (median of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def head_flops(cfg, in_dim: int, num_tasks: int, num_groups: int) -> int:
    head = cfg.head
    if head.type == "linear":
        return 2 * in_dim * num_tasks
    widths = [in_dim, *head.expert_dims]
    expert = sum(2 * a * b for a, b in zip(widths, widths[1:]))
    towers = [widths[-1], *head.tower_dims, 1]
    tower = sum(2 * a * b for a, b in zip(towers, towers[1:]))
    if head.type == "mmoe":
        return head.num_experts * expert + 2 * in_dim * num_groups * head.num_experts + num_tasks * tower
    return expert + 2 * widths[-1] * num_tasks


def attention_step_flops(num_layers: int, d: int, lengths: torch.Tensor) -> float:
    """Training FLOPs of causal QK^T and AV over rows of S = 2 x length tokens (3 x forward)."""
    seq = 2 * lengths.double()
    return 3 * num_layers * float((4 * d * seq * (seq + 1) / 2).sum())


def step_flops(model, lengths: torch.Tensor, num_actions: int, context: int, num_tasks: int,
               num_groups: int) -> float:
    """Training FLOPs of one step on rows of the given lengths (3 x the forward count)."""
    cfg = model.cfg
    d = model.transformer.blocks[0].attn.num_heads * model.transformer.blocks[0].attn.head_dim
    impressions = int(lengths.sum())
    tokens = 2 * impressions
    # q, k, v projections for every token in every layer; output projection and FFN for every
    # token except in the last layer, where only post tokens are computed (actions' outputs are
    # never read: see Transformer.forward)
    qkv, rest = 6 * d * d, 2 * d * d + 4 * d * cfg.ffn_dim
    per_token = cfg.num_layers * qkv + (cfg.num_layers - 1) * rest
    per_impression = rest + 2 * num_actions * d + head_flops(cfg, d + context, num_tasks, num_groups)
    if cfg.d_model:
        per_impression += 2 * model.posts.out_dim * d
    return 3 * (tokens * per_token + impressions * per_impression) + attention_step_flops(cfg.num_layers, d, lengths)


def gemm_ceiling(d: int, ffn: int, rows: int, repeats: int = 10) -> float:
    """FLOP/s of the model's own matmul shapes alone: (rows x d) through the d->3d, d->d, d->f,
    f->d linears, forward and backward (3 GEMMs each), no other op. Thin matrices (d = 48) run
    far below the square-matrix peak: this bounds what the dense part of the model can reach."""
    x = torch.randn(rows, d, requires_grad=True)
    layers = [nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, ffn, bias=False),
              nn.Linear(ffn, d, bias=False)]
    inputs = [x, x, x, torch.randn(rows, ffn, requires_grad=True)]
    flops = 3 * 2 * rows * (3 * d * d + d * d + d * ffn + ffn * d)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        for layer, inp in zip(layers, inputs):
            layer(inp).sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return flops / statistics.median(times)


def attention_ceiling(rows: int, seq: int, heads: int, head_dim: int, repeats: int = 10) -> float:
    """FLOP/s of causal SDPA alone (forward + backward) at the model's batch shape; counted like
    ``step_flops`` (causal half, 3 x forward)."""
    q, k, v = (torch.randn(rows, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    flops = 3 * 4 * rows * heads * head_dim * seq * (seq + 1) / 2
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return flops / statistics.median(times)


class Reference(nn.Module):
    """nn.TransformerEncoder with equal dimensions: the straightforward implementation."""

    def __init__(self, d: int, heads: int, ffn: int, layers: int, dropout: float, num_tasks: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, num_tasks)

    def forward(self, x, padding):
        seq = x.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)  # True = masked, like `padding`
        return self.head(self.encoder(x, mask=causal, src_key_padding_mask=padding, is_causal=True))


def time_reference(model, batches, num_tasks) -> float:
    cfg = model.cfg
    d = model.transformer.blocks[0].attn.num_heads * model.transformer.blocks[0].attn.head_dim
    ref = Reference(d, cfg.num_heads, cfg.ffn_dim, cfg.num_layers, cfg.dropout, num_tasks)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    inputs = []
    for b in batches:
        seq = 2 * int(b.lengths.max())
        padding = torch.arange(seq)[None] >= 2 * b.lengths[:, None]
        inputs.append((torch.randn(len(b.lengths), seq, d), padding))
    times = []
    for i, (x, padding) in enumerate(inputs):
        start = time.perf_counter()
        out = ref(x, padding)
        loss = out[~padding].pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sum(times)


def measure(size: str, args, peak: float) -> dict:
    from feedsr.data.tasks import task_groups
    from feedsr.runtime.sharding import compile_dense, unwrap
    from feedsr.train.trainer import sampled_trainer

    overrides = [f"data.path={args.data}", "data.num_workers=0", "run_id=bench_train",
                 "output_root=/tmp/feedsr_bench_train", "trainer.tensorboard=false", *SIZES[size],
                 f"trainer.num_threads={torch.get_num_threads()}"]
    # compiling: a few shapes until dynamic shapes kick in
    warm = args.warmup if args.warmup is not None else (10 if args.compile else 3)
    with sampled_trainer(overrides, args.steps + warm) as (trainer, sample):
        config = trainer.config
        model = unwrap(trainer.model)
        if args.compile:
            compile_dense(trainer.model)
        for batch in sample[:warm]:
            trainer.train_step(batch)
        start = time.perf_counter()
        for batch in sample[warm:]:
            trainer.train_step(batch)
        seconds = time.perf_counter() - start
        timed = sample[warm:]
        imps = sum(int(b.lengths.sum()) for b in timed)
        tasks = len(trainer.tasks)
        groups = len(task_groups(trainer.tasks))
        flops = sum(step_flops(model, b.lengths, len(config.data.action_names), len(config.data.context),
                               tasks, groups) for b in timed)
        ref_seconds = time_reference(model, sample, tasks)
        d = model.transformer.blocks[0].attn.num_heads * model.transformer.blocks[0].attn.head_dim
        padded_tokens = statistics.median(2 * len(b.lengths) * int(b.lengths.max()) for b in timed)
        ceiling = gemm_ceiling(d, config.model.ffn_dim, int(padded_tokens))
        attention_flops = sum(attention_step_flops(config.model.num_layers, d, b.lengths) for b in timed)
        median = sorted(timed, key=lambda b: int(b.lengths.max()))[len(timed) // 2]
        heads = config.model.num_heads
        attention = attention_ceiling(len(median.lengths), 2 * int(median.lengths.max()), heads, d // heads)
    return {
        "size": size, "threads": torch.get_num_threads(), "steps": len(timed),
        "impressions_per_s": imps / seconds, "tokens_per_s": 2 * imps / seconds,
        "model_flops_per_step": flops / len(timed), "achieved_flops": flops / seconds,
        "share_of_peak": flops / seconds / peak,
        "reference_impressions_per_s": imps / ref_seconds, "speedup_vs_reference": ref_seconds / seconds,
        "gemm_shape_flops": ceiling, "gemm_shape_share_of_peak": ceiling / peak,
        "attention_share_of_flops": attention_flops / flops, "attention_kernel_flops": attention, "attention_kernel_share_of_peak": attention / peak,
    }


def main(argv=None):
    from feedsr.quiet import quiet_libraries

    quiet_libraries()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(f"dense fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    rows = [measure(size, args, peak) for size in args.sizes]
    print(f"{'size':8s} {'imps/s':>9s} {'tokens/s':>9s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} "
          f"{'% peak':>7s} {'ref imps/s':>11s} {'x ref':>6s} {'GEMM-shape % peak':>18s} {'SDPA % peak':>12s}")
    for r in rows:
        print(f"{r['size']:8s} {r['impressions_per_s']:9,.0f} {r['tokens_per_s']:9,.0f} "
              f"{r['model_flops_per_step'] / 1e9:11.3f} {r['achieved_flops'] / 1e9:8.2f} "
              f"{100 * r['share_of_peak']:6.1f}% {r['reference_impressions_per_s']:11,.0f} "
              f"{r['speedup_vs_reference']:6.2f} {100 * r['gemm_shape_share_of_peak']:17.1f}% "
              f"{100 * r['attention_kernel_share_of_peak']:11.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"matmul_peak_flops": peak, "results": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
