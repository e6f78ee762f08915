"""The KV scoring path as two ahead-of-time compiled programs (torch.export + AOTInductor).

``python -m feedsr.serve export --checkpoint CK --out DIR`` writes

    DIR/history.pt2      one member's history -> every layer's keys and values (attnmvp: and
                         AttnLFA's keys and values)
    DIR/candidates.pt2   N candidates of that member over the cached keys and values -> (N, K)
                         probabilities
    DIR/export.json      what a runner needs besides the programs: id features and their table
                         sizes, context, dense and action names, tasks, the longest history, the
                         calibration (optional), and where the weights came from

Both programs are the model's own steps (``FeedSR.dense_post_tokens``, ``interleave``, ``rope``,
``predict``; the scorer's ``history_kv`` and ``over_cache``, for attnmvp ``item_tokens``'
steps, ``item_history_kv`` and ``over_item_cache``) traced with dynamic history length
and candidate count; ``feedsr/serve/exported.py`` runs them without the model code. Inputs are
plain tensors: ids of every id feature stacked (F, 1, S) in table order (the programs take them
modulo the table sizes, as training's ``collate`` does), action bits, the numbers (1, S, C + E):
the C context features then the E dense ones, in ``export.json``'s ``context`` and ``dense``
order (one input, so that a model without dense features, and an export made before they
existed, take the same inputs), timestamps, positions. One member per call (B = 1): a request.

Only a causal history can be exported (not ``model.session_mask``, not ``model.use_history=false``):
their masks depend on sessions and the request time; the eager scorer serves those. Both
backbones are exported; ``export.json`` names the model's and its tokens per impression (2: X_t,
A_t interleaved; 1: X_t for attnmvp), which the runner cuts the cache by.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from feedsr.eval.calibration import Calibration
from feedsr.eval.trained import Trained
from feedsr.model.feedsr import FeedSR
from feedsr.serve import attention
from feedsr.serve.exported import CANDIDATE_PROGRAM, EXPORT_META, HISTORY_PROGRAM
from feedsr.serve.scorer import history_kv, item_history_kv, over_cache, over_item_cache
from feedsr.serve.scorer import max_history as longest_history

MAX_CANDIDATES = 65_536  # the candidate dimension's upper bound in the exported program


class ExportError(ValueError):
    """A model or request the exported programs cannot serve."""


class HistoryProgram(nn.Module):
    """(ids (F, 1, T), action_bits (1, T), numbers (1, T, C + E): context then dense features,
    timestamps (1, T)) -> the L layers' keys, then their values, each (1, H, 2T, Dh); attnmvp:
    each (1, H, T, Dh), then AttnLFA's keys and values (1, H, T, Dh)."""

    def __init__(self, model: FeedSR, num_actions: int, context_dim: int):
        super().__init__()
        self.model, self.num_actions, self.context_dim = model, num_actions, context_dim

    def forward(self, ids, action_bits, numbers, timestamps):
        model, c = self.model, self.context_dim
        x = model.dense_post_tokens(list(ids.unbind(0)), numbers[..., :c], numbers[..., c:])  # (1, T, D)
        bits = torch.arange(self.num_actions, device=action_bits.device)
        actions = ((action_bits[..., None] >> bits) & 1).to(x.dtype)  # the multi-hot, as collate decodes it
        if not model.interleaved:
            return self._items(x, model.action_proj(actions), timestamps)
        seq = model.interleave(x, model.action_proj(actions))  # (1, 2T, D)
        positions = torch.arange(x.shape[1], device=x.device).repeat_interleave(2)[None]
        angles = model.rope(positions, timestamps.repeat_interleave(2, dim=1), timestamps[:, :1])
        keys, values = history_kv(model, seq, angles, attention.sdpa(None))  # causal
        # contiguous: the candidate program is compiled for the strides it was traced with, and
        # a compiled program's outputs need not have the eager views' strides
        return tuple(t.contiguous() for t in (*keys, *values))

    def _items(self, x, a, timestamps):
        """attnmvp: the items under the model's strictly causal item mask (a causal history)."""
        model, length = self.model, x.shape[1]
        angles = model.rope(torch.arange(length, device=x.device)[None], timestamps, timestamps[:, :1])
        visible = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)[None, None]
        keys, values, pool = item_history_kv(model, model.positioned(x), a, angles, model.attend(visible))
        return tuple(t.contiguous() for t in (*keys, *values, *pool))


class CandidateProgram(nn.Module):
    """(ids (F, 1, N), numbers (1, N, C + E): context then dense features, positions (1, N),
    index (1,), request_time (1,), origin (1,), keys..., values...) -> (1, N, K) probabilities.
    ``index``: the history length L (the candidates' impression index); ``origin``: the history's
    first timestamp; keys and values (1, H, 2L, Dh): the history's, every token visible to the
    candidates (attnmvp: (1, H, L, Dh), then AttnLFA's keys and values)."""

    def __init__(self, model: FeedSR, context_dim: int):
        super().__init__()
        self.model, self.context_dim = model, context_dim
        self.num_layers = len(model.transformer.blocks)

    def forward(self, ids, numbers, positions, index, request_time, origin, *kv):
        model, c = self.model, self.context_dim
        context = numbers[..., :c]
        x = model.dense_post_tokens(list(ids.unbind(0)), context, numbers[..., c:])  # (1, N, D)
        if model.abs_positions is not None:
            x = x + model.abs_positions(index)[:, None]
        angles = model.rope(index[:, None], request_time[:, None], origin[:, None])  # (1, 1, Dh/2) or None
        if angles is not None:
            angles = angles.expand(-1, x.shape[1], -1)
        # the keys and values are the member's history, all of it visible (no mask)
        keys, values = list(kv[:self.num_layers]), list(kv[self.num_layers:2 * self.num_layers])
        if model.interleaved:
            h = over_cache(model, x, angles, keys, values, None)
        else:
            h = over_item_cache(model, x, angles, keys, values, tuple(kv[2 * self.num_layers:]), None)
        logits = model.predict(h.flatten(0, 1), context.flatten(0, 1), positions.flatten())
        return logits.sigmoid().reshape(x.shape[0], x.shape[1], -1)


def check_exportable(trained: Trained) -> None:
    cfg = trained.model.cfg if isinstance(trained.model, FeedSR) else None
    if cfg is None:
        raise ExportError(f"only Feed-SR models are exported, {trained.checkpoint} holds "
                          f"{type(trained.model).__name__}")
    if cfg.session_mask or not cfg.use_history:
        raise ExportError(f"{trained.checkpoint}: model.session_mask={cfg.session_mask}, "
                          f"model.use_history={cfg.use_history}: only a causal history is exported "
                          "(score it with the eager scorer)")


def example_inputs(trained: Trained, history_len: int, num_candidates: int, device) -> tuple[tuple, tuple]:
    """Inputs of both programs for a random history and candidates (for tracing and tests)."""
    spec, model = trained.spec, trained.model
    generator = torch.Generator().manual_seed(0)
    features, context = len(spec.id_features), len(spec.read.context)
    numbers = context + len(spec.read.dense)

    def ids(n):
        return torch.randint(0, 1_000, (features, 1, n), generator=generator).to(device)

    timestamps = torch.sort(torch.randint(1_600_000_000, 1_600_100_000, (1, history_len), generator=generator))[0]
    history = (ids(history_len), torch.randint(0, 2 ** len(spec.read.action_names), (1, history_len),
                                                 generator=generator).to(device),
               torch.rand(1, history_len, numbers, generator=generator).to(device), timestamps.to(device))
    with torch.inference_mode():
        kv = HistoryProgram(model, len(spec.read.action_names), context)(*history)
    candidates = (ids(num_candidates), torch.rand(1, num_candidates, numbers, generator=generator).to(device),
                  torch.randint(-1, 10, (1, num_candidates), generator=generator).to(device),
                  torch.tensor([history_len], device=device), timestamps[:, -1].to(device) + 60,
                  timestamps[:, 0].to(device), *kv)
    return history, candidates


def exportable_history(trained: Trained, max_history: int | None = None) -> int:
    """The longest history the programs of ``trained`` will take (ExportError when the model or
    the length cannot be exported): ``max_history``, default the trained windows'
    (``max_seq_len - 1``; longer only with RoPE, see ``scorer.max_history``)."""
    check_exportable(trained)
    try:
        max_history = longest_history(trained.model, trained.config.data.max_seq_len - 1, max_history)
    except ValueError as e:
        raise ExportError(f"{trained.checkpoint}: {e}") from None
    if max_history < 2:
        raise ExportError(f"--max-history {max_history}: the exported history program takes >= 2 impressions")
    return max_history


def trace(trained: Trained, max_history: int) -> dict[str, torch.export.ExportedProgram]:
    """Both programs traced by ``torch.export`` (not compiled yet), by file name, for histories
    of 2..``max_history`` impressions and 1..``MAX_CANDIDATES`` candidates."""
    model, spec = trained.model, trained.spec
    device = next(model.parameters()).device
    history, candidates = example_inputs(trained, min(8, max_history), 5, device)
    t = torch.export.Dim("history", min=2, max=max_history)
    # the candidates' cache: 2 tokens per impression (attnmvp: 1), as many for a one-impression
    # history (the runner cuts the copy it pads such a history with, see exported.py)
    per = model.tokens_per_impression
    s = torch.export.Dim("history_tokens", min=per, max=per * max_history)
    n = torch.export.Dim("candidates", min=1, max=MAX_CANDIDATES)
    layers, context = len(model.transformer.blocks), len(spec.read.context)
    cached = 2 * layers + (0 if model.interleaved else 2)  # attnmvp: AttnLFA's keys and values
    programs = [
        (HISTORY_PROGRAM, HistoryProgram(model, len(spec.read.action_names), context), history,
         ({2: t}, {1: t}, {1: t}, {1: t})),
        (CANDIDATE_PROGRAM, CandidateProgram(model, context), candidates,
         ({2: n}, {1: n}, {1: n}, None, None, None, tuple([{2: s}] * cached))),  # *kv: one tuple
    ]
    with torch.inference_mode():
        return {name: torch.export.export(program, inputs, dynamic_shapes=dynamic)
                for name, program, inputs, dynamic in programs}


def export_meta(trained: Trained, max_history: int, calibration: Calibration | None = None) -> dict:
    """The ``export.json`` of the programs of ``trained`` for histories of <= ``max_history``."""
    model, spec = trained.model, trained.spec
    return {
        "checkpoint": str(trained.checkpoint),
        "device": next(model.parameters()).device.type,
        "torch": torch.__version__,
        "id_features": list(spec.id_features),
        "id_table_sizes": dict(spec.id_table_sizes),
        "categorical": list(spec.read.categorical),
        "context": list(spec.read.context),
        "dense": list(spec.read.dense),  # absent from exports made before dense features: none
        "action_names": list(spec.read.action_names),
        "tasks": [{"name": task.name, "actions": list(task.actions), "group": task.group} for task in spec.tasks],
        "session_gap_s": spec.session_gap_s,
        "layers": len(model.transformer.blocks),
        "backbone": model.cfg.backbone,
        "tokens_per_impression": model.tokens_per_impression,  # absent from older exports: 2
        "max_history": max_history,
        "trained_max_history": trained.config.data.max_seq_len - 1,
        "min_history": 2,
        "calibration": None if calibration is None else calibration.to_dict(),
    }


def export(trained: Trained, out: Path, calibration: Calibration | None = None, progress=print,
           max_history: int | None = None) -> dict:
    """Export, compile and write both programs and ``export.json`` to ``out``; returns the meta.
    ``max_history``: the longest history the programs take (default: the trained windows',
    ``max_seq_len - 1``; longer only with RoPE, see ``scorer.max_history``)."""
    max_history = exportable_history(trained, max_history)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    programs = trace(trained, max_history)
    progress(f"export: traced {', '.join(programs)} ({time.perf_counter() - start:.0f} s)")
    with torch.inference_mode():
        for name, exported in programs.items():
            # dynamic_threads: the kernels use the thread count of the process that runs them
            # (torch.set_num_threads), not the one of the process that compiled them
            with torch._inductor.config.patch({"cpp.dynamic_threads": True}):
                torch._inductor.aoti_compile_and_package(exported, package_path=str(out / name))
            progress(f"export: compiled {name} ({time.perf_counter() - start:.0f} s)")
    meta = export_meta(trained, max_history, calibration)
    (out / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta
