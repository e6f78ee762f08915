"""Shared-context candidate scoring: N candidates per member, the history encoded once.

One-by-one scoring runs the model on [history, candidate] for every candidate: N forward passes
over 2L + 1 tokens. Since a candidate's post token X_c never sees its own action token, its score
is the model's output at X_c, which depends on the history and X_c only. So all N candidates can
share one pass over the history, as long as each candidate sees the history and itself and no
other candidate (SPEC section 6):

- ``masked``: one sequence [history | C_1..C_N] through the model's own transformer with a
  boolean mask (candidate rows: the history and the diagonal).
- ``kv``: the history alone through the blocks once, keeping each layer's keys and values; then
  all candidates through the blocks together, attending to [cached history ; themselves].
- ``flex``: the masked pass with a FlexAttention block mask (compiled; causal history only).
- ``one_by_one``: the reference, ``model(collate(history + candidate))`` per candidate.

Every candidate sits at impression index L (RoPE position L, learned position L), with the
request time as its timestamp, exactly where one-by-one scoring puts it.

With ``model.backbone=attnmvp`` the history is item tokens alone and a candidate never sees
itself (the model's attention is strictly causal): every layer is plain cross-attention of the
candidates over the cached history keys and values (which carry the history's actions), and the
cache keeps AttnLFA's keys (from the history's final states) and values (its action tokens) for
the pooling after the last block. ``masked`` and ``one_by_one`` serve it too; ``flex`` does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from feedsr.data.batch import Batch, BatchSpec, collate, pad_jagged
from feedsr.data.block import SequenceBlock, session_ids
from feedsr.model.feedsr import FAR_FUTURE_SESSION, FeedSR
from feedsr.serve import attention
from feedsr.serve.candidates import Candidates, appended

METHODS = ("kv", "masked", "flex", "one_by_one")


@dataclass
class HistoryCache:
    """Each layer's keys and values over a padded batch of member histories.

    Args:
        history: the collated histories; their lengths and timestamps place the candidates.
        keys: per layer, (B, H, 2T, Dh) post-RoPE keys; token 2t is X_t, 2t+1 is A_t, and tokens
            past 2 * lengths[b] are padding (never visible to candidates). attnmvp: (B, H, T, Dh),
            token t is X_t.
        values: per layer, (B, H, 2T, Dh) (attnmvp: (B, H, T, Dh), carrying the actions).

    It depends on the history only (not on the request time), so it can be kept between requests.
    """

    history: Batch
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block: SequenceBlock | None = None  # the histories as given (to recognise an extended one)
    pool: tuple[torch.Tensor, torch.Tensor] | None = None  # attnmvp: AttnLFA's (B, H, T, Dh) keys, values

    @property
    def nbytes(self) -> int:
        """Memory of the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + list(self.pool or ()))


@dataclass
class Placement:
    """Where each member's candidates sit in its sequence.

    Args:
        index: (B,) their impression index L_b (history length): learned position and RoPE position.
        angles: (B, Dh/2) their RoPE angles (position L_b, and the request time with a time-aware ``model.rope``),
            None without RoPE.
        visible: (B,) history tokens they attend to: 2 L_b (L_b for attnmvp); with
            ``session_mask`` only the sessions before the request's; 0 for the no-history ablation.
    """

    index: torch.Tensor
    angles: torch.Tensor | None
    visible: torch.Tensor


class CandidateScorer:
    """Scores candidate posts for members with a trained, unsharded ``FeedSR`` in eval mode.

    Args:
        model: a ``FeedSR`` from ``build_model`` (plain TorchRec ``EmbeddingCollection``).
        spec: the ``BatchSpec`` the model was trained with (id features, dense and context
            features, tasks).

    Example::

        scorer = CandidateScorer(model.eval(), spec)
        # history: a SequenceBlock of B = 1 member with L = 1000 impressions (as the reader
        # yields them); 512 candidate posts for it, requested at time `now`
        cands = Candidates(counts=[512], request_times=[now], values={"item_ids": ..., ...})
        probs = scorer.score(history, cands)               # (512, K) probabilities
        cache = scorer.encode_history(history)             # or keep the history's keys/values
        probs = scorer.score_cached(cache, cands)          # and score later requests from it
    """

    def __init__(self, model: FeedSR, spec: BatchSpec):
        if not isinstance(model, FeedSR):
            raise TypeError(f"CandidateScorer needs a FeedSR model, got {type(model).__name__}")
        self.model, self.spec = model, spec

    # ------------------------------------------------------------------ public API

    def score(self, history: SequenceBlock, candidates: Candidates, method: str = "kv") -> torch.Tensor:
        """(N, K) task probabilities of every candidate, in the candidates' (member-major) order.

        Args:
            history: B members' histories, oldest first, at least one impression each.
            candidates: N = sum(counts) candidates, ``counts`` (B,) per member.
            method: ``kv``, ``masked``, ``flex`` or ``one_by_one`` (equal up to float error).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got '{method}'")
        self._check_candidates(len(history), candidates)
        self._check_history(history)
        if method == "one_by_one":
            return self._one_by_one(history, candidates)
        history_batch = collate(history, self.spec)
        with torch.inference_mode():
            if method == "kv":
                return self._score_kv(self._encode(history_batch), candidates)
            return self._score_single_pass(history_batch, candidates, flex=method == "flex")

    def encode_history(self, history: SequenceBlock) -> HistoryCache:
        """Run the histories through the blocks once; keep each layer's keys and values."""
        self._check_eval()
        self._check_history(history)
        with torch.inference_mode():
            return dataclasses.replace(self._encode(collate(history, self.spec)), block=history)

    def update_history(self, cache: HistoryCache, history: SequenceBlock) -> HistoryCache:
        """The cache of ``history``, one member's, reusing ``cache`` where ``history`` extends the
        history cached there (the same member and impressions, then new ones): only the new
        impressions' tokens run through the blocks, attending to the cached keys and values and,
        causally, to each other. Otherwise (another member, a changed or cut prefix, several
        members, or a model whose history mask is not causal: ``session_mask``, no history) the
        history is encoded in full. Equal to ``encode_history(history)`` either way."""
        self._check_eval()
        self._check_history(history)
        if not self._extends(cache, history):
            return self.encode_history(history)
        with torch.inference_mode():
            return self._extend(cache, history)

    def score_cached(self, cache: HistoryCache, candidates: Candidates) -> torch.Tensor:
        """(N, K) probabilities of the candidates of the members in ``cache`` (see ``score``)."""
        self._check_candidates(cache.history.batch_size, candidates)
        with torch.inference_mode():
            return self._score_kv(cache, candidates)

    # ------------------------------------------------------------------ checks and inputs

    def _check_eval(self) -> None:
        if self.model.training:
            raise ValueError("CandidateScorer needs the model in eval mode (dropout, gate dropout and "
                             "the fixed scoring position): call model.eval() first")

    def _check_candidates(self, num_members: int, candidates: Candidates) -> None:
        self._check_eval()
        if len(candidates.counts) != num_members:
            raise ValueError(f"candidates are for {len(candidates.counts)} members, the history has "
                             f"{num_members}")

    def _check_history(self, history: SequenceBlock) -> None:
        if (history.lengths < 1).any():
            raise ValueError(f"every member needs a history of >= 1 impression, got lengths "
                             f"{history.lengths}")
        if history.time_goes_back().any():  # sessions and the candidates' place follow the time order
            raise ValueError("histories must be oldest first (timestamps non-decreasing within a member), "
                             "as stored; not session-shuffled")
        abs_positions = self.model.abs_positions
        if abs_positions is not None and history.lengths.max() >= abs_positions.num_embeddings:
            raise ValueError(f"history length {history.lengths.max()} leaves no learned position for the "
                             f"candidates (the model has {abs_positions.num_embeddings})")

    # ------------------------------------------------------------------ the reference

    def _one_by_one(self, history: SequenceBlock, candidates: Candidates) -> torch.Tensor:
        """The model's own forward on [history, candidate] for each candidate; its last row."""
        block = candidates.to_block(self.spec)
        member_of = torch.repeat_interleave(torch.from_numpy(candidates.counts))
        rows = []
        with torch.inference_mode():
            for row, member in enumerate(member_of.tolist()):
                batch = collate(appended(history, member, block, row), self.spec)
                rows.append(self.model(batch)[-1])
        return torch.stack(rows).sigmoid()

    # ------------------------------------------------------------------ shared pieces

    def _placement(self, history: Batch, request_times: torch.Tensor) -> Placement:
        """Place the candidates as impression L_b of [history_b, candidate] at the request time.

        The model's own ``rotary`` and the data's ``session_ids`` (with the spec's gap) run on that
        extended timeline, so the time origin (first history impression) and the sessions are the
        ones training used.
        """
        index, per = history.lengths, self.model.tokens_per_impression
        timeline = _extended_timeline(history, request_times)
        _, mask = pad_jagged(timeline.timestamps, timeline.lengths, int(timeline.lengths.max()))
        angles = self.model.rotary(timeline, mask)  # (B or 1, 2(T+1) or T+1, Dh/2)
        if angles is not None:
            angles = angles.expand(len(index), -1, -1)[torch.arange(len(index)), per * index]  # candidate's X
        cfg = self.model.cfg
        if not cfg.use_history:
            visible = torch.zeros_like(index)
        elif cfg.session_mask:  # a candidate sees the sessions before its own (a prefix)
            visible = per * self._earlier_sessions(history, timeline)
        else:
            visible = per * index
        return Placement(index, angles, visible)

    def _earlier_sessions(self, history: Batch, timeline: Batch) -> torch.Tensor:
        """(B,) history impressions in sessions before the candidates' own, with the session ids
        the history's mask uses; the candidates' session follows from the request time."""
        sessions = session_ids(timeline.timestamps.numpy(), timeline.lengths.numpy(), self.spec.session_gap_s)
        current = torch.from_numpy(sessions)[torch.cumsum(timeline.lengths, 0) - 1]  # (B,) appended ones
        max_len = int(history.lengths.max())
        past, _ = pad_jagged(history.session_ids, history.lengths, max_len, FAR_FUTURE_SESSION)  # (B, T)
        return (past < current[:, None]).sum(1)

    def _candidate_tokens(self, candidates: Batch, place: Placement) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (B, N, D) candidate post tokens and their (B, N) mask."""
        model = self.model
        x = model.post_tokens(candidates.sparse, candidates.context, candidates.dense)  # (N, D)
        if model.abs_positions is not None:
            x = x + model.abs_positions(place.index).repeat_interleave(candidates.lengths, dim=0)
        return pad_jagged(x, candidates.lengths, int(candidates.lengths.max()))

    def _candidate_angles(self, place: Placement, num_candidates: int) -> torch.Tensor | None:
        """(B, N, Dh/2): every candidate of a member has the same rotation."""
        return None if place.angles is None else place.angles[:, None].expand(-1, num_candidates, -1)

    def _head(self, h: torch.Tensor, candidates: Batch) -> torch.Tensor:
        """(N, D) transformer outputs -> (N, K) probabilities, by the model's own ``predict``."""
        return self.model.predict(h, candidates.context, candidates.positions).sigmoid()

    # ------------------------------------------------------------------ single pass (mask / flex)

    def _score_single_pass(self, history: Batch, candidates: Candidates, flex: bool) -> torch.Tensor:
        model, max_len = self.model, int(history.lengths.max())
        cand = collate(candidates.to_block(self.spec), self.spec)
        place = self._placement(history, torch.from_numpy(candidates.request_times))
        if not model.interleaved:
            if flex:
                raise ValueError("method='flex' serves the interleaved backbone only (the model has "
                                 "model.backbone=attnmvp): use kv or masked")
            return self._score_items_single_pass(history, cand, place)
        seq, hist_mask = model.tokens(history, max_len)  # (B, 2T, D)
        cand_tokens, cand_mask = self._candidate_tokens(cand, place)  # (B, N, D)
        x = torch.cat([seq, cand_tokens], dim=1)  # (B, 2T + N, D)
        angles = model.rotary(history, hist_mask)
        if angles is not None:
            angles = torch.cat([angles.expand(len(seq), -1, -1),
                                self._candidate_angles(place, cand_tokens.shape[1])], dim=1)
        if flex:
            h = self._flex_blocks(x, angles, place, cand_tokens.shape[1])
        else:
            mask = attention.shared_context_mask(
                self.model.attention_mask(history, max_len), 2 * max_len, place.visible, cand_tokens.shape[1])
            h = model.transformer(x, angles, mask)  # the model's own blocks, SDPA with our mask
        return self._head(h[:, 2 * max_len:][cand_mask], cand)

    def _score_items_single_pass(self, history: Batch, cand: Batch, place: Placement) -> torch.Tensor:
        """attnmvp: [X_1..X_T | C_1..C_N] through the model's blocks under its strict attention,
        candidates seeing the visible history and nothing else; candidates carry no action."""
        model, max_len = self.model, int(history.lengths.max())
        x, a, hist_mask = model.item_tokens(history, max_len)  # (B, T, D)
        cand_tokens, cand_mask = self._candidate_tokens(cand, place)  # (B, N, D)
        num_candidates = cand_tokens.shape[1]
        x = torch.cat([model.positioned(x), cand_tokens], dim=1)
        a = torch.cat([a, torch.zeros_like(cand_tokens)], dim=1)
        angles = model.rotary(history, hist_mask)
        if angles is not None:
            angles = torch.cat([angles.expand(len(x), -1, -1), self._candidate_angles(place, num_candidates)], dim=1)
        visible = attention.shared_context_mask(model.attention_mask(history, max_len), max_len, place.visible,
                                                num_candidates, own=False)
        attend = model.attend(visible)
        h = model.transformer(x, angles, attend=attend, value_add=model.action_values(a))
        pooled = model.action_pool(h, a, angles, attend)
        return self._head(model.fuse(h, pooled)[:, max_len:][cand_mask], cand)

    def _flex_blocks(self, x, angles, place: Placement, num_candidates: int) -> torch.Tensor:
        cfg = self.model.cfg
        if cfg.session_mask or not cfg.use_history:
            raise ValueError("method='flex' supports a causal history only "
                             "(not session_mask, not use_history=False)")
        attend = attention.flex(x.shape[1] - num_candidates, place.visible, num_candidates)
        for block in self.model.transformer.blocks:
            x = block(x, angles, None, attend)
        return self.model.transformer.ln_out(x)

    # ------------------------------------------------------------------ KV cache

    def _encode(self, history: Batch) -> HistoryCache:
        model, max_len = self.model, int(history.lengths.max())
        if not model.interleaved:
            x, a, mask = model.item_tokens(history, max_len)  # (B, T, D)
            keys, values, pool = item_history_kv(model, model.positioned(x), a, model.rotary(history, mask),
                                                 model.attend(model.attention_mask(history, max_len)))
            return HistoryCache(history, keys, values, pool=pool)
        x, mask = model.tokens(history, max_len)  # (B, 2T, D)
        keys, values = history_kv(model, x, model.rotary(history, mask),
                                  attention.sdpa(model.attention_mask(history, max_len)))
        return HistoryCache(history, keys, values)

    def _extends(self, cache: HistoryCache, history: SequenceBlock) -> bool:
        """Whether ``history`` is the one member of ``cache`` with impressions appended, under a
        causal history mask (then the cached tokens never see the new ones)."""
        old, cfg = cache.block, self.model.cfg
        if old is None or len(old) != 1 or len(history) != 1 or cfg.session_mask or not cfg.use_history:
            return False
        cached = int(old.lengths[0])
        return (int(history.lengths[0]) >= cached and old.rows["member_id"][0] == history.rows["member_id"][0]
                and all(k in history.values and np.array_equal(history.values[k][:cached], v)
                        for k, v in old.values.items()))

    def _extend(self, cache: HistoryCache, history: SequenceBlock) -> HistoryCache:
        model, batch = self.model, collate(history, self.spec)
        length, per = int(history.lengths[0]), model.tokens_per_impression
        start = per * int(cache.block.lengths[0])  # the first new token
        # embeddings are cheap, the blocks are not: tokens and angles of the whole history, cut
        if model.interleaved:
            x, mask = model.tokens(batch, length)  # (1, 2L, D)
        else:
            x, a, mask = model.item_tokens(batch, length)  # (1, L, D)
            x = model.positioned(x)
        angles = model.rotary(batch, mask)
        x = x[:, start:]
        angles = None if angles is None else angles[:, start:]
        # new token i is token start + i: it sees every cached token and the new ones up to
        # itself (attnmvp: before itself; none is left seeing nothing, the cache holds >= 1 item)
        own = 0 if model.interleaved else -1
        visible = torch.ones(x.shape[1], per * length, dtype=torch.bool).tril(diagonal=start + own)
        if model.interleaved:
            keys, values = history_kv(model, x, angles, attention.sdpa(visible), (cache.keys, cache.values))
            return HistoryCache(batch, keys, values, history)
        keys, values, pool = item_history_kv(model, x, a[:, start:], angles, attention.sdpa(visible), cache)
        return HistoryCache(batch, keys, values, history, pool)

    def _score_kv(self, cache: HistoryCache, candidates: Candidates) -> torch.Tensor:
        cand = collate(candidates.to_block(self.spec), self.spec)
        place = self._placement(cache.history, torch.from_numpy(candidates.request_times))
        x, cand_mask = self._candidate_tokens(cand, place)  # (B, N, D)
        # no mask when every candidate sees its member's whole cache (one member, causal history)
        visible = None if bool((place.visible == cache.keys[0].shape[2]).all()) else place.visible
        angles = self._candidate_angles(place, x.shape[1])
        if not self.model.interleaved:
            h = over_item_cache(self.model, x, angles, cache.keys, cache.values, cache.pool, visible)
            return self._head(h[cand_mask], cand)
        h = over_cache(self.model, x, angles, cache.keys, cache.values, visible)
        return self._head(h[cand_mask], cand)


def max_history(model: FeedSR, trained_max: int, requested: int | None = None) -> int:
    """The longest history (impressions) to serve: ``requested``, else ``trained_max`` (the
    training windows' ``max_seq_len - 1``: the candidate takes the last position).

    Longer than trained is allowed only without learned absolute positions (RoPE positions are
    computed, learned ones stop at ``max_seq_len``); the model then sees positions it was not
    trained on, which may cost quality: measure it before serving that way.
    """
    if requested is None:
        return trained_max
    if requested < 1:
        raise ValueError(f"the longest history must be >= 1 impression, got {requested}")
    if model.abs_positions is not None and requested > trained_max:
        raise ValueError(f"the model has learned positions for {trained_max + 1} tokens of impressions "
                         f"(max_seq_len); a history of {requested} leaves none for the candidates")
    return requested


def history_kv(model: FeedSR, x: torch.Tensor, angles: torch.Tensor | None, history_attention,
               past: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's (B, H, S, Dh) keys and values of the history tokens ``x`` (B, S, D), the
    history attending under ``history_attention`` (an ``Attend``). ``past``: every layer's keys
    and values of the tokens before ``x`` (a cached history that ``x`` extends); ``x``'s are
    appended to them, and ``history_attention`` sees the whole."""
    keys, values = [], []

    def joined(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if past is None:
            return k, v
        return torch.cat([past[0][layer], k], dim=2), torch.cat([past[1][layer], v], dim=2)

    def attend(q, k, v, scale):
        k, v = joined(len(keys), k, v)
        keys.append(k)
        values.append(v)
        return history_attention(q, k, v, scale)

    *blocks, last = model.transformer.blocks
    for block in blocks:
        x = block(x, angles, None, attend)
    # The last block's outputs at history tokens are never read: candidates need only its
    # keys and values, so its attention and FFN over the history are skipped.
    k, v = joined(len(keys), *last.attn.heads(last.ln_attn(x), angles)[1:])
    return keys + [k], values + [v]


def over_cache(model: FeedSR, x: torch.Tensor, angles: torch.Tensor | None, keys: list[torch.Tensor],
               values: list[torch.Tensor], visible: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) transformer outputs of candidate tokens ``x`` (B, N, D), each attending to the
    first ``visible`` (B,) cached history tokens of its member (None: all of them) and to itself."""
    transformer = model.transformer
    for block, k, v in zip(transformer.blocks, keys, values):
        x = block(x, angles, None, attention.cached(k, v, visible))
    return transformer.ln_out(x)


def item_history_kv(model: FeedSR, x: torch.Tensor, a: torch.Tensor, angles: torch.Tensor | None,
                    history_attention, past: HistoryCache | None = None,
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """attnmvp: each layer's (B, H, T, Dh) keys and values of the history items ``x`` (B, T, D),
    learned positions added, with actions ``a`` (the values carry them), the items attending
    under ``history_attention`` (an ``Attend``); and AttnLFA's keys (from the final states) and
    values (the actions). ``past``: the cache of the items before ``x`` (a history that ``x``
    extends); ``x``'s keys and values are appended to its, and ``history_attention`` sees the
    whole. Strict causality makes that exact: no cached item's state depends on a later one."""
    keys, values = [], []

    def attend(q, k, v, scale):
        if past is not None:
            layer = len(keys)
            k, v = torch.cat([past.keys[layer], k], dim=2), torch.cat([past.values[layer], v], dim=2)
        keys.append(k)
        values.append(v)
        return history_attention(q, k, v, scale)

    # every block runs in full: the pooling's keys are the last block's outputs
    h = model.transformer(x, angles, attend=attend, value_add=model.action_values(a))
    _, pool_keys = model.action_pool.queries_keys(h, angles)
    pool = (pool_keys, model.action_pool.values(a))
    if past is not None:
        pool = tuple(torch.cat([old, new], dim=2) for old, new in zip(past.pool, pool))
    return keys, values, pool


def over_item_cache(model: FeedSR, x: torch.Tensor, angles: torch.Tensor | None, keys: list[torch.Tensor],
                    values: list[torch.Tensor], pool: tuple[torch.Tensor, torch.Tensor],
                    visible: torch.Tensor | None) -> torch.Tensor:
    """attnmvp: (B, N, 2D) fused representations of the candidate tokens ``x`` (B, N, D): every
    layer cross-attends over the first ``visible`` (B,) cached history items (None: all), then
    AttnLFA pools the history's actions (``pool``: its cached keys and values) for them. No
    candidate sees itself or another."""
    transformer, action_pool = model.transformer, model.action_pool
    for block, k, v in zip(transformer.blocks, keys, values):
        x = block(x, angles, None, attention.cached_past(k, v, visible))
    h = transformer.ln_out(x)
    q, _ = action_pool.queries_keys(h, angles)
    pooled = action_pool.output(attention.cached_past(*pool, visible)(q, None, None, action_pool.scale))
    return model.fuse(h, pooled)


def _extended_timeline(history: Batch, request_times: torch.Tensor) -> Batch:
    """The history with one more impression per member at its request time.

    Only ``lengths`` and ``timestamps`` are meaningful (what ``FeedSR.rotary`` reads); the other
    fields still describe the history.
    """
    lengths = history.lengths + 1
    ends = torch.cumsum(lengths, 0) - 1  # flat index of each member's appended impression
    is_new = torch.zeros(int(lengths.sum()), dtype=torch.bool)
    is_new[ends] = True
    timestamps = history.timestamps.new_empty(len(is_new))
    timestamps[~is_new] = history.timestamps
    timestamps[is_new] = request_times
    return dataclasses.replace(history, lengths=lengths, timestamps=timestamps)
