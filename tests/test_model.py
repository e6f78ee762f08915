"""Model invariants: no leakage, RoPE relativity, padding invariance, heads, gradients, training."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from conftest import MODEL_SPEC, make_batch, make_block
from feedsr.data.batch import collate
from feedsr.data.block import SequenceBlock, session_shuffle
from feedsr.data.config import DataConfig
from feedsr.model import build_model
from feedsr.model.config import ModelConfig, PositionBiasConfig, check_model_config, model_width
from feedsr.model.embeddings import ContextNorm
from feedsr.model.heads import HeadConfig, MMoEHead
from feedsr.model.rope import apply_rope, rope_angles


def model_of(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"embedding_dim": 8, "num_layers": 2, "num_heads": 2, "ffn_dim": 32, **overrides})
    model = build_model(cfg, MODEL_SPEC, max_seq_len=32).eval()
    if getattr(model, "time_rotation", None) is not None:
        wake_time_rotation(model.time_rotation)
    return model


def wake_time_rotation(rotation) -> None:
    """A learned time rotation starts as position RoPE (its last layers at zero): give them
    weights, so that time moves the angles in the tests."""
    with torch.no_grad():
        for layer in (rotation.siren[-1], rotation.mlp[-1]):
            layer.weight.normal_(0, 0.5)
            layer.bias.normal_(0, 0.5)


def edited(block: SequenceBlock, column: str, index: int, value) -> SequenceBlock:
    values = {k: v.copy() for k, v in block.values.items()}
    values[column][index] = value
    return dataclasses.replace(block, values=values)


def predict(model, block):
    with torch.no_grad():
        return model(collate(block, MODEL_SPEC))


VARIANTS = {"feedsr": {}, "dcnv2": {"name": "dcnv2"}, "attnmvp": {"backbone": "attnmvp"},
            "learned_time": {"rope": "learned_time"}, "attnmvp_time": {"backbone": "attnmvp", "rope": "time"},
            "token_context": {"token_context": True, "d_model": 24},
            "context_bins": {"context_bins": 4}, "dcnv2_context_bins": {"name": "dcnv2", "context_bins": 4}}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("column", ["action_bits", "item_ids", "ctx_age", "cat_surface"])
def test_no_leakage_from_own_action_or_the_future(name, column):
    block, t = make_block([8], seed=1), 4
    model = model_of(**VARIANTS[name])
    base = predict(model, block)
    if column == "action_bits":  # A_t is the label of t: invisible at t, visible after
        changed = predict(model, edited(block, column, t, 7 - block.values[column][t]))
        torch.testing.assert_close(changed[: t + 1], base[: t + 1], rtol=0, atol=0)
        assert (changed[t + 1:] - base[t + 1:]).abs().max() > 1e-4
    else:  # a change at t+1 leaves 0..t alone; a change at t-1 reaches t
        new = {"item_ids": 63, "ctx_age": 5.0, "cat_surface": 3}[column]
        later = predict(model, edited(block, column, t + 1, new))
        torch.testing.assert_close(later[: t + 1], base[: t + 1], rtol=0, atol=0)
        # late-fused context affects t only; in the tokens as well, it reaches the later ones
        if column in ("item_ids", "cat_surface") or (column == "ctx_age" and name == "token_context"):
            earlier = predict(model, edited(block, column, t - 1, new))
            assert (earlier[t] - base[t]).abs().max() > 1e-5


@pytest.mark.parametrize("backbone", ["interleaved", "attnmvp"])
def test_session_mask_hides_same_session_tokens(backbone):
    block = make_block([9], seed=2, gap_every=3)  # sessions {0,1,2} {3,4,5} {6,7,8}
    model = model_of(session_mask=True, backbone=backbone)
    base = predict(model, block)
    for column, value in [("item_ids", 61), ("action_bits", 5)]:
        changed = predict(model, edited(block, column, 3, value))  # first of the middle session
        if column == "item_ids":  # X_3 itself does change prediction 3
            assert (changed[3] - base[3]).abs().max() > 1e-5
        torch.testing.assert_close(changed[4:6], base[4:6], rtol=0, atol=0)
        torch.testing.assert_close(changed[:3], base[:3], rtol=0, atol=0)
        assert (changed[6:] - base[6:]).abs().max() > 1e-5  # later sessions see it


@pytest.mark.parametrize("backbone", ["interleaved", "attnmvp"])
def test_no_history_ablation_sees_only_the_impression(backbone):
    block = make_block([6], seed=3)
    edit = edited(edited(block, "item_ids", 2, 60), "action_bits", 1, 7)
    keep = [0, 1, 3, 4, 5]
    model = model_of(use_history=False, backbone=backbone)
    base, changed = predict(model, block), predict(model, edit)
    torch.testing.assert_close(changed[keep], base[keep], rtol=0, atol=0)
    assert (changed[2] - base[2]).abs().max() > 1e-5  # its own item still counts
    # positive control: the same edit moves the later predictions of a model with history, so
    # the equality above is the ablation's doing, not an edit the model cannot see
    model = model_of(use_history=True, backbone=backbone)
    base, changed = predict(model, block), predict(model, edit)
    assert all((changed[t] - base[t]).abs().max() > 1e-5 for t in (3, 4, 5))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    def score(pq, pk, base=100.0, tq=None, tk=None):
        aq = rope_angles(torch.tensor([[float(pq)]]), 16, base, None if tq is None else torch.tensor([[tq]]))
        ak = rope_angles(torch.tensor([[float(pk)]]), 16, base, None if tk is None else torch.tensor([[tk]]))
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum(-1)
    torch.testing.assert_close(score(7, 3), score(107, 103))
    assert (score(7, 3) - score(7, 5)).abs().max() > 1e-3
    torch.testing.assert_close(score(7, 3, tq=10.0, tk=2.5), score(50, 46, tq=30.0, tk=22.5))
    assert (score(7, 3, tq=10.0, tk=2.5) - score(7, 3, tq=10.0, tk=5.0)).abs().max() > 1e-3


@pytest.mark.parametrize("rope", ["position", "time", "learned_time"])
def test_post_and_action_share_a_rotation(rope):
    model = model_of(rope=rope)
    batch = make_batch([5, 3])
    angles = model.rotary(batch, torch.ones(2, 5, dtype=torch.bool))  # (B, 2T, Dh/2)
    torch.testing.assert_close(angles[:, 0::2], angles[:, 1::2], rtol=0, atol=0)
    assert (angles[:, 2::2] != angles[:, 0:-2:2]).any()
    items_model = model_of(rope=rope, backbone="attnmvp")  # one token per impression, the same angles
    if rope == "learned_time":
        items_model.time_rotation.load_state_dict(model.time_rotation.state_dict())
    items = items_model.rotary(batch, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(items.expand(2, -1, -1), angles[:, 0::2].expand(2, -1, -1), rtol=0, atol=1e-5)


def learned_rotation_scores(positions, timestamps, origin=0):
    """Query-key scores between every pair of 4 tokens under one learned time rotation."""
    from feedsr.model.rope import LearnedTimeRotation

    torch.manual_seed(0)
    rotation = LearnedTimeRotation(8, 100.0)
    wake_time_rotation(rotation)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with torch.no_grad():
        angles = rotation(torch.tensor([positions]), torch.tensor([timestamps]), torch.tensor([[origin]]))
    return apply_rope(q, angles) @ apply_rope(k, angles).transpose(-1, -2)


def test_learned_time_rotation_is_relative_in_position_and_periodic_in_the_week():
    """SIREN-RoPE's angles: f(T) omega + p inv_freq lambda. The position part is relative; the
    time part is a function of each token's time of day and week and its time since the member's
    first impression, so scores keep under a shift of every position, and under a shift of every
    timestamp (the origin too) by whole weeks, and move with the time of day."""
    week = 7 * 86_400
    times = [1_650_000_000 + dt for dt in (0, 40, 3_600, 90_000)]
    base = learned_rotation_scores([0, 1, 2, 3], times, times[0])
    torch.testing.assert_close(learned_rotation_scores([10, 11, 12, 13], times, times[0]), base)
    shifted = [t + 3 * week for t in times]
    torch.testing.assert_close(learned_rotation_scores([0, 1, 2, 3], shifted, shifted[0]), base)
    later = [t + 6 * 3_600 for t in times]  # the same gaps, six hours later in the day
    assert (learned_rotation_scores([0, 1, 2, 3], later, later[0]) - base).abs().max() > 1e-3
    assert (learned_rotation_scores([0, 2, 4, 6], times, times[0]) - base).abs().max() > 1e-3


def test_a_new_learned_time_rotation_is_position_rope():
    """Its last layers start at zero: before training it rotates as plain RoPE does."""
    from feedsr.model.rope import LearnedTimeRotation

    rotation = LearnedTimeRotation(8, 100.0)
    positions, times = torch.arange(6.0)[None], torch.randint(1_600_000_000, 1_700_000_000, (1, 6))
    torch.testing.assert_close(rotation(positions, times, times[:, :1]), rope_angles(positions, 8, 100.0))
    model = build_model(ModelConfig(embedding_dim=8, rope="learned_time"), MODEL_SPEC, max_seq_len=32)
    extra = sum(p.numel() for p in model.time_rotation.parameters())
    assert extra == 2 * (5 * 64 + 64 + 64 * 64 + 64 + 64 * 6 + 6) + 6 + 1


def test_strict_attention_gives_a_query_without_keys_zero_and_no_gradient():
    """AttnMVP's attention: a token that sees nothing (the first, or one in the first session)
    gets a zero output, and nothing flows back to its own value (its label)."""
    from feedsr.model.transformer import item_mask, strict_attention

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8, requires_grad=True)
    attend = strict_attention(item_mask(torch.tensor([4]), 4, None, history=True))
    y = attend(q, k, v, 0.35)
    assert (y[0, 0, 0] == 0).all() and (y[0, 0, 1:] != 0).any()
    y[0, 0, 0].sum().backward()
    assert (v.grad == 0).all()
    y = attend(q, k, v, 0.35)
    y[0, 0, 2].sum().backward()  # token 2 reads 0 and 1, never itself or 3
    assert (v.grad[0, 0, 2:] == 0).all() and (v.grad[0, 0, :2] != 0).all()
    torch.testing.assert_close(y[0, 0, 1], v[0, 0, 0].detach())  # one key: all the weight


@pytest.mark.parametrize("overrides", [{}, {"session_mask": True}, {"position_encoding": "learned"},
                                       {"rope": "time"}, {"rope": "learned_time"}, {"name": "dcnv2"},
                                       {"late_fusion": False, "d_model": 24}, {"backbone": "attnmvp"},
                                       {"token_context": True, "d_model": 24}, {"context_bins": 3},
                                       {"backbone": "attnmvp", "session_mask": True},
                                       {"backbone": "attnmvp", "position_encoding": "learned"},
                                       {"backbone": "attnmvp", "rope": "learned_time"}])
def test_padding_invariance(overrides):
    model = model_of(**overrides)
    alone = predict(model, make_block([4], seed=5, gap_every=2))
    others = make_block([9, 4, 1, 7], seed=5, gap_every=2)
    # put the lone member in slot 1 of a batch padded to length 9
    mixed = SequenceBlock.concat([others.take([0]), make_block([4], seed=5, gap_every=2), others.take([2, 3])])
    in_batch = predict(model, mixed)
    torch.testing.assert_close(in_batch[9:13], alone, rtol=1e-5, atol=1e-5)


def test_mmoe_gates_sum_to_one():
    head = MMoEHead(12, [0, 1, 1, 2], HeadConfig(num_experts=5))
    weights = head.gate_weights(torch.randn(30, 12))
    assert weights.shape == (30, 3, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(30, 3))


@pytest.mark.parametrize("overrides", [{}, {"name": "dcnv2"}, {"head": HeadConfig(type="dcnv2")},
                                       {"position_encoding": "learned", "d_model": 24},
                                       {"backbone": "attnmvp", "rope": "learned_time"},
                                       {"backbone": "attnmvp", "position_encoding": "learned"}])
def test_every_parameter_gets_a_gradient(overrides):
    model = model_of(**overrides).train()
    batch = make_batch([6, 3, 9], seed=4)
    batch.positions[:] = torch.arange(len(batch.positions)) % 60  # every bias row in range
    logits = model(batch)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # position-bias rows for positions absent from the batch legitimately get no gradient
    assert missing == [], missing


@pytest.mark.parametrize("name", ["feedsr", "dcnv2", "attnmvp"])
def test_no_nan_for_members_without_history(name):
    model = model_of(**VARIANTS[name], session_mask=(name != "dcnv2"))
    out = predict(model, make_block([1, 1, 1], seed=6))
    assert out.shape == (3, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["feedsr", "dcnv2", "attnmvp"])
def test_both_models_train(name):
    model = model_of(**VARIANTS[name], dropout=0.0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = make_batch([12] * 16, seed=7)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_residual_forms_compute_what_they_name():
    """rescale: x + alpha f(LN(x)); plain: x + f(LN(x)), no scalars; post_ln: LN(x + f(x))."""
    from feedsr.model.transformer import DecoderBlock

    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    blocks = {r: DecoderBlock(16, 2, 32, 0.0, 0.0, 0.3, r).eval() for r in ("rescale", "plain", "post_ln")}
    plain, rescale, post = blocks["plain"], blocks["rescale"], blocks["post_ln"]
    assert not any("alpha" in n for n, _ in plain.named_parameters())
    rescale.load_state_dict(plain.state_dict() | {"alpha_attn": torch.tensor(0.3), "alpha_ffn": torch.tensor(0.3)})
    post.load_state_dict(plain.state_dict())
    with torch.no_grad():
        h = x + plain.attn(plain.ln_attn(x), None, None)
        torch.testing.assert_close(plain(x, None, None), h + plain.ffn(plain.ln_ffn(h)))
        h = x + 0.3 * plain.attn(plain.ln_attn(x), None, None)
        torch.testing.assert_close(rescale(x, None, None), h + 0.3 * plain.ffn(plain.ln_ffn(h)))
        h = plain.ln_attn(x + plain.attn(x, None, None))
        torch.testing.assert_close(post(x, None, None), plain.ln_ffn(h + plain.ffn(h)))


@pytest.mark.parametrize("residual", ["rescale", "plain", "post_ln"])
@pytest.mark.parametrize("masked", [False, True])
def test_transformer_keep_equals_selecting_afterwards(masked, residual):
    from feedsr.model.transformer import Transformer, interleaved_mask

    torch.manual_seed(0)
    net = Transformer(16, 2, 2, 32, 0.0, 0.0, 0.5, residual).eval()
    for block in net.blocks:  # non-trivial residual scales
        if residual == "rescale":
            block.alpha_attn.data.fill_(0.7)
            block.alpha_ffn.data.fill_(1.3)
    lengths = torch.tensor([3, 5, 1])
    x = torch.randn(3, 10, 16)
    mask = interleaved_mask(lengths, 5, None, history=False) if masked else None
    keep = torch.rand(3, 10) < 0.5
    full = net(x, None, mask)
    torch.testing.assert_close(net(x, None, mask, keep=keep), full[keep], rtol=1e-5, atol=1e-6)


def long_sessions() -> SequenceBlock:
    """Two members; sessions last longer than the 1800 s gap (impressions 1000 s apart):
    member 0 has one session of 6, member 1 two of 4. Every timestamp is unique."""
    block = make_block([6, 8], seed=8)
    ts = np.array([0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 120, 121, 122, 123]) * 1000
    return dataclasses.replace(block, values=block.values | {"timestamps": ts})


def test_session_mask_ignores_the_in_session_shuffle():
    """Without positions, a session-masked prediction reads a set of earlier sessions: shuffling
    within sessions must only permute the predictions (it did not when the model re-derived
    sessions from the shuffled timestamps: 6 impressions came out as sessions [0, 1, 1, 2, 2, 3])."""
    block = long_sessions()
    shuffled = session_shuffle(block, 1800, np.random.default_rng(0))
    order = np.searchsorted(block.values["timestamps"], shuffled.values["timestamps"])
    assert (order != np.arange(len(order))).any(), "the shuffle left the order alone"
    assert collate(shuffled, MODEL_SPEC).session_ids.tolist() == [0] * 6 + [0] * 4 + [1] * 4
    model = model_of(session_mask=True, position_encoding="none")
    torch.testing.assert_close(predict(model, shuffled), predict(model, block)[order], rtol=1e-5, atol=1e-6)


def test_session_gap_comes_from_the_batch_spec():
    """One gap (data.session_gap_s, carried by the BatchSpec): a gap above the sessions' length
    makes member 1 a single session, and member 1's predictions change with it."""
    block = long_sessions()
    wide = dataclasses.replace(MODEL_SPEC, session_gap_s=50_000)
    assert collate(block, wide).session_ids.tolist() == [0] * 14
    model = model_of(session_mask=True)
    with torch.no_grad():
        narrow_out, wide_out = model(collate(block, MODEL_SPEC)), model(collate(block, wide))
    torch.testing.assert_close(narrow_out[:10], wide_out[:10], rtol=0, atol=0)
    assert (narrow_out[10:] - wide_out[10:]).abs().max() > 1e-5


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("make,message", [
    (lambda: PositionBiasConfig(score_position=60),
     "model.position_bias.score_position must be in [0, 60) or null, got 60"),
    (lambda: PositionBiasConfig(score_position=-1),
     "model.position_bias.score_position must be in [0, 60) or null, got -1"),
    (lambda: PositionBiasConfig(num_positions=0, score_position=None),
     "model.position_bias.num_positions must be >= 1, got 0"),
    (lambda: ModelConfig(rope_time_unit_s=0.0), "model.rope_time_unit_s must be > 0, got 0.0"),
    (lambda: ModelConfig(rope_base=0.0), "model.rope_base must be > 1, got 0.0"),
    (lambda: ModelConfig(backbone="mvp"), "model.backbone must be one of interleaved, attnmvp, got 'mvp'"),
    (lambda: ModelConfig(action_value_scale=-1.0), "model.action_value_scale must be >= 0, got -1.0"),
    (lambda: ModelConfig(rope="siren"), "model.rope must be one of position, time, learned_time, got 'siren'"),
    (lambda: ModelConfig(rope="learned_time", rope_time=True),
     "model.rope_time=true (the former spelling of model.rope=time) conflicts with model.rope=learned_time"),
    (lambda: ModelConfig(rope="learned_time", position_encoding="learned"),
     "model.rope=learned_time needs model.position_encoding=rope"),
    (lambda: ModelConfig(residual_init=-0.1), "model.residual_init must be >= 0, got -0.1"),
    (lambda: ModelConfig(residual="postln"), "model.residual must be one of rescale, plain, post_ln, got 'postln'"),
    (lambda: ModelConfig(residual_init=float("nan")), "model.residual_init must be >= 0, got nan"),
    (lambda: ModelConfig(d_model=0), "model.d_model must be >= 1 or null, got 0"),
    (lambda: ModelConfig(dcn_cross_layers=-1), "model.dcn_cross_layers must be >= 0, got -1"),
    (lambda: ModelConfig(dcn_deep_dims=[64, 0]), "model.dcn_deep_dims must hold widths >= 1, got [64, 0]"),
    (lambda: HeadConfig(hidden_dims=[0]), "model.head.hidden_dims must hold widths >= 1, got [0]"),
    (lambda: HeadConfig(expert_dims=[-4]), "model.head.expert_dims must hold widths >= 1, got [-4]"),
    (lambda: HeadConfig(tower_dims=[32, -1]), "model.head.tower_dims must hold widths >= 1, got [32, -1]"),
    (lambda: HeadConfig(cross_layers=-1), "model.head.cross_layers must be >= 0, got -1"),
])
def test_bad_model_config_names_key_and_value(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def data_config(**overrides) -> DataConfig:
    """3 id features (author, post_type, surface) and 2 context features."""
    return DataConfig(**{"action_names": ["click"], "tasks": [{"name": "click"}],
                         "id_tables": {"author_ids": 9}, "categorical": {"post_type": 4, "surface": 4},
                         "context": ["age", "quality"], **overrides})


def test_model_width_is_known_before_any_data():
    assert model_width(ModelConfig(), num_id_features=3, context_dim=2) == 48
    assert model_width(ModelConfig(late_fusion=False), num_id_features=3, context_dim=2) == 50
    assert model_width(ModelConfig(token_context=True), num_id_features=3, context_dim=2) == 50
    assert model_width(ModelConfig(d_model=32), num_id_features=3, context_dim=2) == 32
    for cfg in (ModelConfig(embedding_dim=8), ModelConfig(late_fusion=False, d_model=24)):
        model = build_model(cfg, MODEL_SPEC, max_seq_len=8)  # MODEL_SPEC: 3 id features, 1 context
        assert model.transformer.ln_out.normalized_shape[0] == model_width(cfg, 3, 1)


@pytest.mark.parametrize("overrides,message", [
    ({"num_heads": 5}, "model width 48 is not divisible by model.num_heads=5"),
    ({"num_heads": 16}, "RoPE needs an even head dimension: model width 48 / model.num_heads=16 = 3"),
    ({"num_heads": 24, "rope": "time"},
     "model.rope=time needs a head dimension >= 4: model width 48 / model.num_heads=24 = 2"),
    ({"late_fusion": False, "num_heads": 2, "embedding_dim": 15}, "model width 47 is not divisible"),
])
def test_check_model_config_rejects_bad_widths(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_model_config(ModelConfig(**overrides), data_config())


@pytest.mark.parametrize("overrides", [{"late_fusion": False, "d_model": 24}, {"token_context": True, "d_model": 24}])
def test_context_in_the_tokens_is_refused_under_the_in_session_shuffle(overrides):
    """A shuffled later impression of the session precedes the target, and its point-in-time
    context counts the target's own actions: with the context in the tokens that is a label leak."""
    with pytest.raises(ValueError, match="leaks each target's own label"):
        check_model_config(ModelConfig(**overrides), data_config())
    check_model_config(ModelConfig(**overrides), data_config(session_shuffle=False))
    check_model_config(ModelConfig(session_mask=True, **overrides), data_config())  # same session hidden


def test_rope_time_is_the_former_spelling_of_rope_time():
    cfg = ModelConfig(rope_time=True)
    assert (cfg.rope, cfg.rope_time) == ("time", None)  # read once, then model.rope alone
    assert dataclasses.replace(cfg, rope="position").rope == "position"
    assert ModelConfig(rope="time", rope_time=False).rope == "time"


def test_check_model_config_accepts_what_builds():
    check_model_config(ModelConfig(num_heads=3), data_config())
    check_model_config(ModelConfig(num_heads=5, d_model=40), data_config())
    check_model_config(ModelConfig(name="dcnv2", num_heads=5), data_config())  # no attention: no heads


def test_context_norm_is_asinh_of_standard_scores_and_keeps_constant_features():
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0]])
    assert torch.equal(ContextNorm(3, enabled=False)(x), x)  # model.context_norm=false: raw
    norm = ContextNorm(3)
    norm.fit(torch.tensor([2.0, 5.0, 3.0]), torch.tensor([1.0, 0.0, 1e-3]))
    z = torch.tensor([[-1.0, 0.0, -1000.0], [1.0, 0.0, 1000.0]])  # a constant keeps scale 1
    torch.testing.assert_close(norm(x), torch.asinh(z))
    assert norm(x)[1, 2] < 8  # a tail of 1,000 standard deviations comes in at log(2000)
    assert {"shift", "scale"} <= set(norm.state_dict())  # saved with the weights
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\) for 3 features"):
        norm.fit(torch.zeros(2), torch.ones(3))


@pytest.mark.parametrize("name", ["feedsr", "dcnv2"])
@pytest.mark.parametrize("late_fusion", [True, False])
def test_fitted_context_norm_equals_standardised_input(name, late_fusion):
    """A model with context_norm on raw context scores exactly as one without it on the mapped
    context."""
    cfg = ModelConfig(name=name, embedding_dim=8, d_model=16, late_fusion=late_fusion)
    fitted = build_model(cfg, MODEL_SPEC, 32).eval()
    plain = build_model(dataclasses.replace(cfg, context_norm=False), MODEL_SPEC, 32).eval()
    plain.load_state_dict(fitted.state_dict())
    mean, std = torch.tensor([0.7]), torch.tensor([0.2])
    fitted.context_norm.fit(mean, std)
    batch = make_batch([5, 3], seed=1)
    standardised = dataclasses.replace(batch, context=torch.asinh((batch.context - mean) / std))
    with torch.no_grad():
        torch.testing.assert_close(fitted(batch), plain(standardised))
        assert not torch.allclose(fitted(batch), plain(batch))  # the map changes the scores


def test_quantile_encoding_reads_each_bin_between_its_edges():
    """A feature at an edge fills the bins below and none above; between two edges the bin reads
    the fraction passed; tied edges make a step; each feature has its own edges and weights."""
    from feedsr.model.embeddings import QuantileEncoding

    enc = QuantileEncoding(dim=2, bins=3, out_dim=1)
    enc.fit(torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 1.0]]))
    with torch.no_grad():
        enc.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).expand(2, 3)[..., None])
    z = torch.tensor([[1.0, 0.5], [3.0, -1.0], [9.0, 0.0], [-5.0, 2.0]])
    out = enc(z)  # relu(sum_k w_k * bin_k): the bins read as the digits of weights 1, 10, 100
    # feature 1's tied edges at 0: a step, 0 at and below it (a count of 0), both bins full above
    torch.testing.assert_close(out, torch.tensor([[1.0, 61.0], [61.0, 0.0], [111.0, 0.0], [0.0, 111.0]]))
    assert out.shape == (4, 2) and enc.out_dim == 2
    with pytest.raises(ValueError, match="ascending"):
        enc.fit(torch.tensor([[0.0, 2.0, 1.0, 4.0], [0.0, 1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="shape"):
        enc.fit(torch.zeros(2, 3))


@pytest.mark.parametrize("bad,message", [({"context_bins": 1}, "context_bins must be 0"),
                                         ({"context_bins": -2}, "context_bins must be 0"),
                                         ({"context_bins": 8, "context_bin_dim": 0}, "context_bin_dim"),
                                         ({"context_bins": 8, "late_fusion": False}, "needs model.late_fusion")])
def test_context_bins_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**bad)


def test_attention_temperature_reaches_every_attention():
    """HDET's attention-temperature scalar: the blocks' attention and attnmvp's action pooling."""
    from feedsr.model.transformer import ActionPooling, SelfAttention
    from feedsr.train.hdet import set_attention_temperature

    model = model_of(backbone="attnmvp")
    set_attention_temperature(model, 0.7)
    attentions = [m for m in model.modules() if isinstance(m, (SelfAttention, ActionPooling))]
    assert len(attentions) == 3 and {m.temperature for m in attentions} == {0.7}
    assert model.action_pool.scale == pytest.approx(0.7 / math.sqrt(model.action_pool.head_dim))
