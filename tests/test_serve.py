"""Shared-context scoring equals one-by-one scoring; candidates never see each other."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import MODEL_SPEC, SPEC, make_block
from feedsr.model import build_model
from feedsr.model.config import ModelConfig, PositionBiasConfig, context_in_tokens
from feedsr.model.heads import HeadConfig
from feedsr.serve import CandidateScorer, Candidates

MAX_SEQ_LEN = 32
CONFIGS = {
    "rope_mmoe": {},
    "learned": {"position_encoding": "learned"},
    "rope_time": {"rope": "time"},
    "learned_time": {"rope": "learned_time"},
    "no_late_fusion": {"late_fusion": False, "d_model": 24},
    "token_context": {"token_context": True, "d_model": 24},  # context in the tokens and late-fused
    "context_bins": {"context_bins": 4},  # the late-fused context's quantile encoding
    "linear_head": {"head": HeadConfig(type="linear")},
    "logged_position": {"position_bias": PositionBiasConfig(score_position=None)},
    "session_mask": {"session_mask": True},
    "no_history": {"use_history": False},
    "post_ln": {"residual": "post_ln"},  # the block form without RescaleAndAdd, for the HDET tests
    # the non-interleaved backbone: candidates cross-attend over the cached history items
    "attnmvp": {"backbone": "attnmvp"},
    "attnmvp_learned": {"backbone": "attnmvp", "position_encoding": "learned", "action_value_scale": 0.5},
    "attnmvp_time": {"backbone": "attnmvp", "rope": "learned_time"},
    "attnmvp_session_mask": {"backbone": "attnmvp", "session_mask": True},
    "attnmvp_no_history": {"backbone": "attnmvp", "use_history": False},
}
# (history lengths, candidates per member): one member; padded batches, one member without candidates
CASES = [([1], [1]), ([6], [3]), ([9], [17]), ([5, 1, 9], [3, 17, 1]), ([4, 7], [0, 5])]
# The post token with dense features (a 4-d content embedding) beside the id embeddings: width 3 * 8 + 4.
DENSE = ("emb_0", "emb_1", "emb_2", "emb_3")
DENSE_SPEC = dataclasses.replace(MODEL_SPEC, read=dataclasses.replace(SPEC, dense=DENSE))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread only adds synchronization (and on a busy CI
    machine, waiting for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_of(seed=0, spec=MODEL_SPEC, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"embedding_dim": 8, "num_layers": 2, "num_heads": 2, "ffn_dim": 32, **overrides})
    model = build_model(cfg, spec, max_seq_len=MAX_SEQ_LEN).eval()
    with torch.no_grad():  # alpha and position offsets start at 0.1 and 0: make every path matter
        for name, p in model.named_parameters():
            if "alpha" in name or "position_bias" in name:
                p.copy_(torch.randn_like(p))
        if getattr(model, "time_rotation", None) is not None:  # its last layers start at zero: let time turn it
            for layer in (model.time_rotation.siren[-1], model.time_rotation.mlp[-1]):
                layer.weight.normal_(0, 0.5)
                layer.bias.normal_(0, 0.5)
        context = len(spec.read.context)  # a fitted standardisation, for the exported paths too
        model.context_norm.fit(torch.rand(context), torch.rand(context) + 0.5)
        if spec.read.dense:
            model.dense_norm.fit(torch.randn(len(spec.read.dense)), torch.rand(len(spec.read.dense)) + 0.5)
    return model


def dense_values(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random ``dense_<name>`` columns of ``DENSE`` for n impressions, each in its own units."""
    return {f"dense_{c}": (rng.normal(size=n) * (k + 1) + k).astype(np.float32) for k, c in enumerate(DENSE)}


def with_dense(history, seed=0):
    """The history with random dense features (the post token's numbers) on every impression."""
    rng = np.random.default_rng(seed + 100)
    return dataclasses.replace(history, values=history.values | dense_values(len(history.values["timestamps"]), rng))


def make_candidates(history, counts, gap_s=50, seed=0) -> Candidates:
    """Random candidates; each member's request comes ``gap_s`` after its last impression. They
    have dense features when the history has them."""
    rng = np.random.default_rng(seed)
    n = int(sum(counts))
    last_ts = history.values["timestamps"][history.offsets[1:] - 1]
    values = {
        "item_ids": rng.integers(0, 1000, n), "author_ids": rng.integers(0, 16, n),
        "cat_surface": rng.integers(0, 3, n), "ctx_age": rng.random(n).astype(np.float32),
        "positions": rng.integers(-1, 70, n),
    }
    if any(k.startswith("dense_") for k in history.values):
        values |= dense_values(n, rng)
    return Candidates(counts=counts, request_times=last_ts + gap_s, values=values)


@pytest.mark.parametrize("lengths,counts", CASES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_shared_context_equals_one_by_one(config, lengths, counts):
    scorer = CandidateScorer(model_of(**CONFIGS[config]), MODEL_SPEC)
    history = make_block(lengths, seed=len(lengths), gap_every=3)  # sessions of 3 impressions
    for gap_s in (50, 5000):  # the request in the newest history session, and in a new one
        candidates = make_candidates(history, counts, gap_s)
        reference = scorer.score(history, candidates, method="one_by_one")
        assert reference.shape == (sum(counts), len(MODEL_SPEC.tasks))
        for method in ("masked", "kv"):
            torch.testing.assert_close(scorer.score(history, candidates, method), reference,
                                       rtol=0, atol=1e-5, msg=f"{method}, request gap {gap_s}s")


@pytest.mark.parametrize("lengths,counts", [CASES[1], CASES[3], CASES[4]])
@pytest.mark.parametrize("config", ["rope_mmoe", "learned", "no_late_fusion", "token_context", "session_mask",
                                    "attnmvp"])
def test_shared_context_with_dense_features_equals_one_by_one(config, lengths, counts):
    """Dense features in the post token, the history's and the candidates': the shared-context
    scores are the model's own forward on [history, candidate] (one by one)."""
    model = model_of(spec=DENSE_SPEC, **CONFIGS[config])
    assert model.dense_norm is not None and model.posts.numeric_dim == len(DENSE) + (
        1 if context_in_tokens(model.cfg) else 0)
    scorer = CandidateScorer(model, DENSE_SPEC)
    history = with_dense(make_block(lengths, seed=len(lengths), gap_every=3), seed=len(lengths))
    candidates = make_candidates(history, counts)
    reference = scorer.score(history, candidates, method="one_by_one")
    for method in ("masked", "kv"):
        torch.testing.assert_close(scorer.score(history, candidates, method), reference, rtol=0, atol=1e-5,
                                   msg=method)
    torch.testing.assert_close(scorer.score_cached(scorer.encode_history(history), candidates), reference,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["masked", "kv"])
def test_dense_features_reach_the_scores(method):
    """A candidate's dense value moves its own score only; a history impression's moves them all."""
    scorer = CandidateScorer(model_of(spec=DENSE_SPEC), DENSE_SPEC)
    history = with_dense(make_block([6, 3], seed=2))
    candidates = make_candidates(history, [5, 4])
    base = scorer.score(history, candidates, method)
    for column in (f"dense_{c}" for c in DENSE):
        values = {k: v.copy() for k, v in candidates.values.items()}
        values[column][2] += 3.0
        changed = scorer.score(history, dataclasses.replace(candidates, values=values), method)
        others = [i for i in range(9) if i != 2]
        torch.testing.assert_close(changed[others], base[others], rtol=0, atol=0)
        assert (changed[2] - base[2]).abs().max() > 1e-4, column
    values = {k: v.copy() for k, v in history.values.items()}
    values["dense_emb_1"][1] += 3.0  # member 0's second impression
    changed = scorer.score(dataclasses.replace(history, values=values), candidates, method)
    assert (changed[:5] - base[:5]).abs().min() > 0 and torch.equal(changed[5:], base[5:])
    with pytest.raises(ValueError, match=r"lack column\(s\) \['dense_emb_2'\]"):
        values = {k: v for k, v in candidates.values.items() if k != "dense_emb_2"}
        scorer.score(history, dataclasses.replace(candidates, values=values), method)


def test_the_request_time_and_session_matter():
    """Guards the test above: with session_mask and rope_time the two request gaps differ."""
    history = make_block([9], seed=1, gap_every=3)
    for overrides in ({"session_mask": True}, {"rope": "time"}, {"rope": "learned_time"},
                      {"backbone": "attnmvp", "rope": "learned_time"}):
        scorer = CandidateScorer(model_of(**overrides), MODEL_SPEC)
        near, far = (scorer.score(history, make_candidates(history, [4], gap)) for gap in (50, 5000))
        assert (near - far).abs().max() > 1e-4, overrides


@pytest.mark.parametrize("backbone", ["interleaved", "attnmvp"])
@pytest.mark.parametrize("method", ["masked", "kv"])
def test_candidates_do_not_see_each_other(method, backbone):
    scorer = CandidateScorer(model_of(backbone=backbone), MODEL_SPEC)
    history = make_block([6, 3], seed=2)
    candidates = make_candidates(history, [5, 4])
    base = scorer.score(history, candidates, method)
    for column, change in [("item_ids", 1), ("cat_surface", 1), ("ctx_age", 5.0)]:
        values = {k: v.copy() for k, v in candidates.values.items()}
        values[column][2] += change
        values["cat_surface"] %= 3  # a valid surface id
        changed = scorer.score(history, dataclasses.replace(candidates, values=values), method)
        others = [i for i in range(9) if i != 2]
        torch.testing.assert_close(changed[others], base[others], rtol=0, atol=0)
        assert (changed[2] - base[2]).abs().max() > 1e-4, column


@pytest.mark.parametrize("backbone", ["interleaved", "attnmvp"])
def test_history_reaches_the_scores(backbone):
    """Guards the equality tests: the candidates do read the history, through every layer."""
    scorer = CandidateScorer(model_of(backbone=backbone), MODEL_SPEC)
    history = make_block([6], seed=3)
    candidates = make_candidates(history, [3])
    base = scorer.score(history, candidates)
    values = {k: v.copy() for k, v in history.values.items()}
    values["action_bits"][2] ^= 0b111
    changed = scorer.score(dataclasses.replace(history, values=values), candidates)
    assert (changed - base).abs().max() > 1e-4


def test_a_cached_history_serves_later_requests():
    scorer = CandidateScorer(model_of(rope_time=True, session_mask=True), MODEL_SPEC)
    history = make_block([8, 2], seed=4, gap_every=3)
    cache = scorer.encode_history(history)
    for seed, gap_s in [(0, 50), (1, 7200)]:
        candidates = make_candidates(history, [6, 2], gap_s, seed=seed)
        torch.testing.assert_close(scorer.score_cached(cache, candidates),
                                   scorer.score(history, candidates, "one_by_one"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", ["rope_mmoe", "learned", "rope_time", "session_mask", "no_history",
                                    "attnmvp", "attnmvp_learned", "attnmvp_time", "attnmvp_session_mask"])
@pytest.mark.parametrize("cached_len,new_len", [(5, 9), (1, 2), (7, 7)])
def test_an_updated_cache_equals_encoding_the_longer_history(config, cached_len, new_len):
    """A member back with new impressions: the cache of the old history, extended (or, where the
    model's history mask is not causal, re-encoded), equals encoding the new history in full."""
    scorer = CandidateScorer(model_of(**CONFIGS[config]), MODEL_SPEC)
    full = make_block([new_len], seed=6, gap_every=3)
    old = full.gather(np.array([0]), np.array([0]), np.array([cached_len]))  # its first impressions
    cache = scorer.encode_history(old)
    causal = "session_mask" not in config and config != "no_history"
    assert scorer._extends(cache, full) == causal  # extended, not re-encoded, where it can be
    updated = scorer.update_history(cache, full)
    fresh = scorer.encode_history(full)
    cached = fresh.keys + fresh.values + list(fresh.pool or ())  # attnmvp: AttnLFA's keys and values too
    for got, want in zip(updated.keys + updated.values + list(updated.pool or ()), cached, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert updated.nbytes == fresh.nbytes == sum(t.numel() * 4 for t in cached)
    candidates = make_candidates(full, [5])
    torch.testing.assert_close(scorer.score_cached(updated, candidates),
                               scorer.score(full, candidates, "one_by_one"), rtol=0, atol=1e-5)


def test_a_cache_is_extended_only_when_the_history_extends_it():
    """Only new tokens are encoded when the prefix is the cached one; a changed prefix or another
    member is encoded in full (and still scores right)."""
    scorer = CandidateScorer(model_of(), MODEL_SPEC)
    full = make_block([9], seed=7)
    old = full.gather(np.array([0]), np.array([0]), np.array([6]))
    cache = scorer.encode_history(old)
    assert scorer._extends(cache, full)
    values = {k: v.copy() for k, v in full.values.items()}
    values["item_ids"][2] += 1
    changed = dataclasses.replace(full, values=values)
    assert not scorer._extends(cache, changed)
    other = dataclasses.replace(full, rows={**full.rows, "member_id": full.rows["member_id"] + 1})
    assert not scorer._extends(cache, other)
    assert not scorer._extends(cache, old.gather(np.array([0]), np.array([0]), np.array([5])))  # shorter
    fresh = scorer.encode_history(changed)
    for got, want in zip(scorer.update_history(cache, changed).keys, fresh.keys):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_one_layer_model():
    scorer = CandidateScorer(model_of(num_layers=1), MODEL_SPEC)
    history = make_block([5, 2], seed=5)
    candidates = make_candidates(history, [4, 3])
    torch.testing.assert_close(scorer.score(history, candidates),
                               scorer.score(history, candidates, "one_by_one"), rtol=0, atol=1e-5)


def test_bad_requests_are_rejected():
    model = model_of()
    scorer = CandidateScorer(model, MODEL_SPEC)
    history = make_block([4, 2], seed=6)
    candidates = make_candidates(history, [2, 1])
    with pytest.raises(ValueError, match="eval mode"):
        model.train()
        scorer.score(history, candidates)
    model.eval()
    with pytest.raises(ValueError, match="for 1 members, the history has 2"):
        scorer.score(history, make_candidates(history.take([0]), [2]))
    with pytest.raises(ValueError, match=r"lack column\(s\) \['cat_surface'\]"):
        values = {k: v for k, v in candidates.values.items() if k != "cat_surface"}
        scorer.score(history, dataclasses.replace(candidates, values=values))
    with pytest.raises(ValueError, match="histories must be oldest first"):  # session ids read the order
        reversed_times = history.values["timestamps"][::-1].copy()
        scorer.score(dataclasses.replace(history, values=history.values | {"timestamps": reversed_times}),
                     candidates)
    with pytest.raises(ValueError, match="method must be one of"):
        scorer.score(history, candidates, method="fast")
    with pytest.raises(ValueError, match="sum\\(counts\\) = 3 rows"):
        Candidates(counts=[2, 1], request_times=[0, 0], values={"item_ids": [1, 2]})
    learned = CandidateScorer(model_of(position_encoding="learned"), MODEL_SPEC)
    with pytest.raises(ValueError, match="no learned position"):
        learned.score(make_block([MAX_SEQ_LEN]), make_candidates(make_block([MAX_SEQ_LEN]), [1]))
    with pytest.raises(TypeError, match="needs a FeedSR model"):
        CandidateScorer(model_of(name="dcnv2"), MODEL_SPEC)
    with pytest.raises(ValueError, match="method='flex' serves the interleaved backbone only"):
        CandidateScorer(model_of(backbone="attnmvp"), MODEL_SPEC).score(history, candidates, method="flex")


@pytest.mark.slow  # compiles FlexAttention and its block mask (tens of seconds on 2 cores)
def test_flex_attention_equals_one_by_one():
    scorer = CandidateScorer(model_of(rope_time=True), MODEL_SPEC)
    history = make_block([9, 4], seed=7)
    candidates = make_candidates(history, [5, 3])
    torch.testing.assert_close(scorer.score(history, candidates, "flex"),
                               scorer.score(history, candidates, "one_by_one"), rtol=0, atol=1e-5)


def test_both_backbones_are_exported_with_a_causal_history_only():
    """attnmvp is exported like the interleaved backbone; a session mask is refused for either,
    naming the setting (the eager scorer serves it)."""
    from types import SimpleNamespace

    from feedsr.serve.export import ExportError, check_exportable

    for backbone in ("interleaved", "attnmvp"):
        check_exportable(SimpleNamespace(model=model_of(backbone=backbone), checkpoint="run/step-3"))
        with pytest.raises(ExportError, match="run/step-3: model.session_mask=True, .*only a causal history"):
            check_exportable(SimpleNamespace(model=model_of(backbone=backbone, session_mask=True),
                                             checkpoint="run/step-3"))
