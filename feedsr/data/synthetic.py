"""Synthetic impression logs with a known ground truth.

A ranker is only testable end to end on data where the right answer is known. This generator
draws every action from an explicit latent model and writes the true probabilities beside the
labels, so evaluation can put the oracle AUC next to the model's, and so the effects a Feed-SR
model is supposed to exploit (member history at several time scales, position bias, drift over
time) are planted on purpose and can be measured.

The model, for an impression of post p (by author a) to member m at feed position k on surface s
at time t, and for each action:

    interest  = affinity_scale * (u_m . v_p)
                + seq_scale * (h_m . v_p)                                    short-term state
                + long_scale * (g_m . v_p)                                   long-range state
                - fatigue_scale * relu(f_m . v_p - fatigue_threshold)         fatigue
    logit     = bias + weight * interest + quality_p + type_effect[type_p]
                + surface_effect[s] - age_weight * log1p(post age in hours)
                + trend * (t - start) / window
    P(action) = (1 + k) ** -position_exponent * sigmoid(logit)

u_m and v_p are unit topic vectors (v_p = the author's vector plus noise). The three states are
made of the vectors of the member's earlier posts, each weighted by its decay per impression
since (they count impressions, not seconds), and they are the sequential signal: only a model
that reads the member's history can know them.

- h_m, the engagement state: posts m clicked or liked, decay ``seq_decay``. With 0.8, part of it
  outlives a session (0.8 ** 6 ~ 0.26 after a mean-length session): a model that hides the
  current session (SPEC 3, in-session leakage) still finds signal in the earlier ones.
- g_m, the long-range state: the decayed mean (0 before the first) of the posts m liked,
  commented on or shared, decay ``long_decay`` (0.995 keeps a third of an engagement's weight
  200 impressions later): a topic the member engaged with hundreds of impressions ago comes back.
  These deliberate actions are rare, so g_m holds a few topics of the member's own rather than an
  average of everything clicked (which would mostly restate u_m). A mean, not a sum: |g_m . v_p|
  <= 1, so engagement feeding on itself cannot run away over a 1,000-impression history.
- f_m, the fatigue state: every post m was shown, engaged or not, with a fast decay
  ``fatigue_decay``. Several recent impressions close to v_p push f_m . v_p over the threshold
  and lower engagement. It depends on the order of the history, not just on what it holds: the
  same impressions long ago weigh almost nothing, so a model that pools the history into an
  order-free summary cannot represent it.

Actions are drawn independently given these probabilities, so ``true_<action>`` is exactly the
probability each label was drawn with; tasks are correlated through the shared interest term.
Every factor is observable in principle: the post's vector is logged as its content embedding
(``content_<i>``, plus ``content_noise``), its quality as ``post_quality`` (plus
``quality_obs_noise``), and the rest as ids, categoricals, positions, times and the history.

Members have lognormal numbers of impressions grouped into sessions (seconds apart inside a
session, at least ``min_session_gap_s`` between sessions) over a window of ``num_days`` days.
``write_log`` writes the flat impression log (``impressions.parquet``: raw ids, the actions, the
observed features, ``true_<action>``, and the history terms of the interest as ``term_<name>``
so that ``probs_without`` can score the oracle with an effect removed) and the latent vectors
(``latents.npz``, so tests can recompute similarities); ``feedsr.prepare.synthetic.generate``
turns the log into a dataset through the log pipeline, as any log: train/valid/test by whole
days, vocabularies from the training window (a post first shown later is unknown),
``ctx_author_affinity`` as a point-in-time feature, the content embedding as ``dense_content_<i>``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feedsr.data.schema import TRUE_PROB_PREFIX
from feedsr.data.sequences import Split

ACTION_NAMES = ("click", "long_view", "like", "comment", "share")
CONTEXT_NAMES = ("post_quality", "post_age", "author_affinity")
LATENTS_FILE = "latents.npz"
LOG_FILE = "impressions.parquet"
DAY_S = 86_400
CONTENT_PREFIX = "content_"
TERM_PREFIX = "term_"
# The history-dependent terms of the interest, in the order _draw_actions computes them.
HISTORY_TERMS = ("seq", "long", "fatigue")
# Engagements that feed the short-term and the long-range state (per the model above).
_SEQ_ACTIONS = ("click", "like")
_LONG_ACTIONS = ("like", "comment", "share")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return _is_int(x) or isinstance(x, (float, np.floating))


@dataclass
class SyntheticConfig:
    """The generator's knobs. With every default, the base rates come out near click 0.29,
    long_view 0.18, like 0.045, comment 0.010, share 0.006 (the biases were fitted to that by
    measurement; changing other knobs, the history scales above all, moves the rates). The
    long-range state and fatigue are off by default, so the default data stays cheap to learn;
    ``feedsr/conf/data/synthetic_bench.yaml`` turns them on with long histories.

    Catalog:
        dim: size of the latent topic vectors.
        posts_per_member: posts in the catalog per member.
        members_per_author: members per author; at least ``min_authors`` authors.
        author_noise: spread of a post's vector around its author's (0 = identical topics).
        num_post_types: cardinality of ``cat_post_type``.
        post_type_scale: std of the per (post type, action) logit offsets.
        quality_sigma: std of the posts' intrinsic quality (a logit offset).
        quality_obs_noise: std of the noise on ``ctx_post_quality``, the observed quality.
        content_noise: std of the per-post Gaussian noise on the logged content embedding
            ``content_<i>`` (0 = the post's topic vector itself).
        post_history_days: posts exist from this many days before the window start.
    Members and feed:
        impressions_mean, impressions_sigma: lognormal impressions per member (mean, log-std),
            clipped to [min_impressions, max_impressions].
        session_mean_len: mean impressions per session (geometric; a member's sessions are
            capped at ``max_sessions`` so that their gaps fit in the window).
        within_gap_mean_s, max_within_gap_s: seconds between impressions inside a session.
        min_session_gap_s: least quiet time between two sessions of a member.
        follows, follow_prob: each member follows ``follows`` authors near their interests, and
            this share of their impressions comes from those authors.
        recency_hours: mean age of the posts the feed shows.
        surface_probs, surface_effects: share and logit offset of each surface (``cat_surface``).
    Actions:
        action_biases, action_weights: per action (in ACTION_NAMES order), the logit bias and the
            weight of the shared interest term.
        affinity_scale: weight of the static member-post affinity in the interest.
        seq_scale: weight of the short-term engagement state (0 switches it off).
        seq_decay: its per-impression decay, in [0, 1).
        long_scale: weight of the long-range state (0 switches it off).
        long_decay: its per-impression decay, in [0, 1); slow, e.g. 0.995.
        fatigue_scale: weight of the fatigue penalty (0 switches it off).
        fatigue_decay: per-impression decay of the fatigue state, in [0, 1); fast, e.g. 0.7.
        fatigue_threshold: how much recent same-topic exposure (f . v_p) is tolerated before
            engagement falls; >= 0.
        position_exponent: exposure = (1 + position) ** -position_exponent.
        age_weight: logit penalty per unit of log1p(post age in hours).
        trend: logit change from the window's start to its end (engagement drift).
    Time and split:
        start_time: window start, seconds since the epoch (default 2026-01-01 00:00 UTC).
        num_days: window length; the last ``test_days`` are test, the ``valid_days`` before them
            valid, the rest train.
    """

    dim: int = 8
    posts_per_member: float = 3.0
    members_per_author: float = 10.0
    min_authors: int = 20
    author_noise: float = 0.5
    num_post_types: int = 8
    post_type_scale: float = 0.3
    quality_sigma: float = 0.5
    quality_obs_noise: float = 0.3
    content_noise: float = 0.0
    post_history_days: float = 7.0
    impressions_mean: float = 40.0
    impressions_sigma: float = 1.0
    min_impressions: int = 5
    max_impressions: int = 300
    session_mean_len: float = 6.0
    within_gap_mean_s: float = 30.0
    max_within_gap_s: int = 600
    min_session_gap_s: int = 3600
    follows: int = 8
    follow_prob: float = 0.4
    recency_hours: float = 24.0
    surface_probs: tuple[float, ...] = (0.6, 0.25, 0.15)
    surface_effects: tuple[float, ...] = (0.0, -0.4, 0.3)
    action_biases: tuple[float, ...] = (0.3, -0.8, -3.65, -5.45, -5.6)
    action_weights: tuple[float, ...] = (1.0, 1.0, 1.3, 1.2, 1.0)
    affinity_scale: float = 2.0
    seq_scale: float = 2.5
    seq_decay: float = 0.8
    long_scale: float = 0.0
    long_decay: float = 0.995
    fatigue_scale: float = 0.0
    fatigue_decay: float = 0.7
    fatigue_threshold: float = 0.4
    position_exponent: float = 0.5
    age_weight: float = 0.1
    trend: float = -0.3
    start_time: int = 1_767_225_600
    num_days: int = 30
    valid_days: int = 3
    test_days: int = 3

    def __post_init__(self) -> None:
        self._check_types()
        self._check_positive()
        self._check_ranges()
        self._check_lengths()

    def _check_types(self) -> None:
        """Numbers must be numbers (a config from a command line may carry strings); sequences
        become tuples of floats, so a config read back from dataset.json equals the original."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type.startswith("tuple"):
                if not isinstance(value, (list, tuple)) or not all(map(_is_real, value)):
                    raise ValueError(f"synthetic.{f.name} must be a list of numbers, got {value!r}")
                setattr(self, f.name, tuple(float(v) for v in value))
            elif not (_is_int(value) if f.type == "int" else _is_real(value)):
                raise ValueError(f"synthetic.{f.name} must be {f.type}, got {value!r}")

    def _check_positive(self) -> None:
        for name in (
            "dim", "posts_per_member", "members_per_author", "min_authors", "num_post_types",
            "impressions_mean", "min_impressions", "session_mean_len", "within_gap_mean_s",
            "max_within_gap_s", "follows", "recency_hours", "num_days", "valid_days", "test_days",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"synthetic.{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "author_noise", "post_type_scale", "quality_sigma", "quality_obs_noise",
            "content_noise", "post_history_days", "impressions_sigma", "min_session_gap_s",
            "affinity_scale", "seq_scale", "long_scale", "fatigue_scale", "fatigue_threshold",
            "position_exponent", "age_weight", "start_time",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"synthetic.{name} must be >= 0, got {getattr(self, name)!r}")

    def _check_ranges(self) -> None:
        for name in ("seq_decay", "long_decay", "fatigue_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"synthetic.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.follow_prob <= 1:
            raise ValueError(f"synthetic.follow_prob must be in [0, 1], got {self.follow_prob!r}")
        if self.max_impressions < self.min_impressions:
            raise ValueError(
                f"synthetic.max_impressions ({self.max_impressions}) must be >= "
                f"min_impressions ({self.min_impressions})"
            )
        if self.valid_days + self.test_days >= self.num_days:
            raise ValueError(
                f"synthetic.valid_days + test_days ({self.valid_days} + {self.test_days}) must "
                f"leave training days in num_days ({self.num_days})"
            )
        # Session placement reserves every gap inside a session and a session gap after each
        # session; the heaviest member must fit in the window with at least one session.
        reserved = self.max_impressions * self.max_within_gap_s + self.min_session_gap_s
        if reserved >= self.window_s:
            raise ValueError(
                f"synthetic: {self.max_impressions} impressions with gaps up to "
                f"{self.max_within_gap_s}s and a {self.min_session_gap_s}s session gap do not "
                f"fit in num_days={self.num_days}"
            )

    def _check_lengths(self) -> None:
        for name in ("action_biases", "action_weights"):
            if len(getattr(self, name)) != len(ACTION_NAMES):
                raise ValueError(
                    f"synthetic.{name} needs one value per action {list(ACTION_NAMES)}, "
                    f"got {getattr(self, name)!r}"
                )
        if len(self.surface_effects) != len(self.surface_probs):
            raise ValueError(
                f"synthetic.surface_effects {self.surface_effects!r} needs one value per "
                f"surface in surface_probs {self.surface_probs!r}"
            )
        probs = np.asarray(self.surface_probs)
        if np.any(probs < 0) or not math.isclose(probs.sum(), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"synthetic.surface_probs must be >= 0 and sum to 1, got {self.surface_probs!r}"
            )

    @property
    def window_s(self) -> int:
        return self.num_days * DAY_S

    @property
    def max_sessions(self) -> int:
        """The most sessions a member can have: with this many session gaps, any member's
        impressions and gaps still fit in the window (the bound binds only for members with far
        more sessions than session_mean_len gives them)."""
        if self.min_session_gap_s == 0:
            return self.max_impressions
        spare = self.window_s - self.max_impressions * self.max_within_gap_s - 1
        return min(self.max_impressions, spare // self.min_session_gap_s)

    @property
    def content_columns(self) -> list[str]:
        return [f"{CONTENT_PREFIX}{i}" for i in range(self.dim)]


@dataclass
class _Catalog:
    """Authors and posts. Post ids are in creation order."""

    author_vec: np.ndarray  # (authors, dim) unit vectors
    post_author: np.ndarray  # (posts,)
    post_vec: np.ndarray  # (posts, dim) unit vectors
    post_quality: np.ndarray  # (posts,) intrinsic quality, a logit offset
    post_quality_obs: np.ndarray  # (posts,) what ctx_post_quality shows
    post_type: np.ndarray  # (posts,)
    post_created: np.ndarray  # (posts,) seconds, ascending
    type_effect: np.ndarray  # (post types, actions) logit offsets


@dataclass
class _Timeline:
    """Every impression's when and where, member-major and time-sorted within a member."""

    counts: np.ndarray  # (members,) impressions per member
    member: np.ndarray  # (n,)
    timestamps: np.ndarray  # (n,) int seconds, strictly increasing within a member
    positions: np.ndarray  # (n,) index within the session
    surfaces: np.ndarray  # (n,)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _segment_cumsum(values: np.ndarray, starts: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum of ``values`` within segments (``seg`` = segment of each value,
    ``starts`` = first index of each segment)."""
    total = np.cumsum(values) - values
    return total - total[starts][seg]


def _make_catalog(rng: np.random.Generator, cfg: SyntheticConfig, num_members: int) -> _Catalog:
    num_authors = max(cfg.min_authors, round(num_members / cfg.members_per_author))
    num_posts = max(1, round(num_members * cfg.posts_per_member))
    author_vec = _unit(rng.standard_normal((num_authors, cfg.dim)))
    # A few prolific authors write most posts, as on a real feed.
    activity = rng.lognormal(0.0, 1.0, num_authors)
    post_author = rng.choice(num_authors, size=num_posts, p=activity / activity.sum())
    noise = rng.standard_normal((num_posts, cfg.dim)) * (cfg.author_noise / math.sqrt(cfg.dim))
    post_vec = _unit(author_vec[post_author] + noise)
    quality = rng.normal(0.0, cfg.quality_sigma, num_posts)
    quality_obs = quality + rng.normal(0.0, cfg.quality_obs_noise, num_posts)
    post_type = rng.integers(cfg.num_post_types, size=num_posts)
    first = cfg.start_time - round(cfg.post_history_days * DAY_S)
    created = np.sort(rng.integers(first, cfg.start_time + cfg.window_s, size=num_posts))
    # Pin the oldest post to the earliest time the feed can ask for, so every lookup finds one.
    created[0] = first
    type_effect = rng.normal(0.0, cfg.post_type_scale, (cfg.num_post_types, len(ACTION_NAMES)))
    type_effect -= type_effect.mean(axis=0)  # centred, so base rates do not drift with the seed
    return _Catalog(
        author_vec, post_author, post_vec, quality, quality_obs, post_type, created, type_effect
    )


def _make_members(
    rng: np.random.Generator, cfg: SyntheticConfig, num_members: int, catalog: _Catalog
) -> tuple[np.ndarray, np.ndarray]:
    """(member vectors (members, dim), followed authors (members, follows)).

    Each member follows the authors closest to their interests among a random shortlist, with
    Gumbel noise so follows are not purely topical.
    """
    member_vec = _unit(rng.standard_normal((num_members, cfg.dim)))
    num_authors = len(catalog.author_vec)
    shortlist = rng.integers(num_authors, size=(num_members, max(4 * cfg.follows, 32)))
    score = 3.0 * np.einsum("md,mkd->mk", member_vec, catalog.author_vec[shortlist])
    score += rng.gumbel(size=score.shape)
    best = np.argsort(-score, axis=1, kind="stable")[:, : cfg.follows]
    return member_vec, np.take_along_axis(shortlist, best, axis=1)


def _impression_counts(rng: np.random.Generator, cfg: SyntheticConfig, n: int) -> np.ndarray:
    # Lognormal with the configured mean: mu = log(mean) - sigma^2 / 2.
    mu = math.log(cfg.impressions_mean) - cfg.impressions_sigma**2 / 2
    counts = np.rint(rng.lognormal(mu, cfg.impressions_sigma, n))
    return np.clip(counts, cfg.min_impressions, cfg.max_impressions).astype(np.int64)


def _make_timeline(rng: np.random.Generator, cfg: SyntheticConfig, num_members: int) -> _Timeline:
    counts = _impression_counts(rng, cfg, num_members)
    n = int(counts.sum())
    member = np.repeat(np.arange(num_members), counts)
    member_start = np.concatenate([[0], np.cumsum(counts)[:-1]])

    # Sessions: geometric lengths, and every member's first impression opens one. Past
    # max_sessions a member's impressions join the last session, so the gaps fit the window.
    new_session = rng.random(n) < 1.0 / cfg.session_mean_len
    new_session[member_start] = True
    earlier_sessions = _segment_cumsum(new_session.astype(np.int64), member_start, member)
    new_session &= earlier_sessions < cfg.max_sessions
    session = np.cumsum(new_session) - 1
    session_start = np.flatnonzero(new_session)
    positions = np.arange(n) - session_start[session]

    # Seconds after the session's start: integer gaps >= 1 s keep timestamps strictly increasing.
    gaps = 1 + np.floor(rng.exponential(cfg.within_gap_mean_s, n))
    gaps = np.minimum(gaps, cfg.max_within_gap_s).astype(np.int64)
    gaps[session_start] = 0
    in_session = _segment_cumsum(gaps, session_start, session) + gaps

    # Place sessions: reserve each session's duration plus the minimum gap before the next one,
    # and spread the member's sessions uniformly over what is left of the window.
    duration = np.add.reduceat(gaps, session_start)
    s_member = member[session_start]
    s_first = np.concatenate([[0], np.flatnonzero(np.diff(s_member)) + 1])
    reserved = duration + cfg.min_session_gap_s
    # Every member has a session, so a session's member id is also its segment index.
    reserved_before = _segment_cumsum(reserved, s_first, s_member)
    free = cfg.window_s - np.add.reduceat(reserved, s_first)
    # Sorting member + U[0,1) sorts the uniforms within each member.
    spread = np.sort(s_member + rng.random(len(s_member))) - s_member
    s_time = cfg.start_time + np.floor(spread * free[s_member]).astype(np.int64) + reserved_before
    surfaces = rng.choice(len(cfg.surface_probs), size=len(s_member), p=cfg.surface_probs)
    return _Timeline(counts, member, s_time[session] + in_session, positions, surfaces[session])


def _latest_by_author(catalog: _Catalog, author: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per query, the newest post by ``author`` created at or before ``before``; -1 if none."""
    created = catalog.post_created - catalog.post_created[0]
    span = int(created[-1]) + 1
    # Post ids are in creation order, so a stable sort by author sorts by (author, creation) and
    # author * span + creation is an increasing key. Clipping a query to the newest post's time
    # keeps it inside its author's key range and changes no answer.
    by_author = np.argsort(catalog.post_author, kind="stable")
    keys = catalog.post_author[by_author] * span + created[by_author]
    query = author * span + np.minimum(before - catalog.post_created[0], span - 1)
    j = np.searchsorted(keys, query, side="right") - 1
    candidate = by_author[np.maximum(j, 0)]
    return np.where((j >= 0) & (catalog.post_author[candidate] == author), candidate, -1)


def _pick_posts(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    timeline: _Timeline,
    follows: np.ndarray,
    catalog: _Catalog,
) -> np.ndarray:
    """The post of every impression: a recent post from the whole catalog, or (with probability
    ``follow_prob``) a recent post by one of the member's followed authors. Never a post created
    after the impression."""
    n = len(timeline.member)

    def recent_time() -> np.ndarray:
        # The feed favours fresh posts: look for one created about an exponential age ago, but
        # no earlier than the oldest post, so the catalog-wide lookup always finds one.
        age = np.rint(rng.exponential(cfg.recency_hours * 3600, n)).astype(np.int64)
        return np.maximum(timeline.timestamps - age, catalog.post_created[0])

    anywhere = np.searchsorted(catalog.post_created, recent_time(), side="right") - 1
    author = follows[timeline.member, rng.integers(follows.shape[1], size=n)]
    followed = _latest_by_author(catalog, author, recent_time())
    use_followed = (rng.random(n) < cfg.follow_prob) & (followed >= 0)
    return np.where(use_followed, followed, anywhere)


def _age_hours(timeline: _Timeline, catalog: _Catalog, posts: np.ndarray) -> np.ndarray:
    return (timeline.timestamps - catalog.post_created[posts]) / 3600.0


def _static_logits(
    cfg: SyntheticConfig,
    timeline: _Timeline,
    member_vec: np.ndarray,
    catalog: _Catalog,
    posts: np.ndarray,
) -> np.ndarray:
    """(n, actions) logits without the history terms, which need the drawn history."""
    affinity = cfg.affinity_scale * np.einsum(
        "nd,nd->n", member_vec[timeline.member], catalog.post_vec[posts]
    )
    per_impression = (
        catalog.post_quality[posts]
        + np.asarray(cfg.surface_effects)[timeline.surfaces]
        - cfg.age_weight * np.log1p(_age_hours(timeline, catalog, posts))
        + cfg.trend * (timeline.timestamps - cfg.start_time) / cfg.window_s
    )
    return (
        np.asarray(cfg.action_biases)
        + np.asarray(cfg.action_weights) * affinity[:, None]
        + catalog.type_effect[catalog.post_type[posts]]
        + per_impression[:, None]
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _step_major(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, active): ``order`` lists the member-major impressions by (index t within the
    member, member by descending count), and ``active[t]`` is how many members have a t-th
    impression. Step t is then the contiguous slice of ``order`` of length active[t], and its
    members are always the first active[t] of the same member ranking."""
    by_count = np.argsort(-counts, kind="stable")
    active = np.searchsorted(-counts[by_count], -np.arange(counts.max()), side="left")
    member_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranked_start = member_start[by_count]
    step = np.repeat(np.arange(len(active)), active)
    rank = np.arange(len(step)) - np.repeat(np.cumsum(active) - active, active)
    return ranked_start[rank] + step, active


@dataclass
class _MemberStates:
    """The history states of the model above, one row per member in the walk's ranking (see
    ``_step_major``): decayed sums of post vectors (and the weight that makes g_m a mean)."""

    engaged: np.ndarray  # (members, dim) h_m: clicked or liked posts
    active: np.ndarray  # (members, dim) liked, commented or shared posts; g_m = active / weight
    active_weight: np.ndarray  # (members,) the decayed count of those posts
    seen: np.ndarray  # (members, dim) f_m: every impression

    @classmethod
    def zeros(cls, num_members: int, dim: int) -> _MemberStates:
        return cls(np.zeros((num_members, dim)), np.zeros((num_members, dim)),
                   np.zeros(num_members), np.zeros((num_members, dim)))


def _history_terms(cfg: SyntheticConfig, states: _MemberStates, v: np.ndarray) -> np.ndarray:
    """(k, len(HISTORY_TERMS)) the history terms of the interest for the first k ranked members,
    whose next impressions show posts ``v`` (k, dim)."""
    k = len(v)
    seq = np.einsum("md,md->m", states.engaged[:k], v)
    # A member without such engagements has active = 0: the term is 0, never 0 / 0.
    long = np.einsum("md,md->m", states.active[:k], v)
    long /= np.maximum(states.active_weight[:k], 1e-12)
    seen = np.einsum("md,md->m", states.seen[:k], v)
    return np.stack([
        cfg.seq_scale * seq,
        cfg.long_scale * long,
        -cfg.fatigue_scale * np.maximum(seen - cfg.fatigue_threshold, 0.0),
    ], axis=1)


_SEQ_INDEX = [ACTION_NAMES.index(a) for a in _SEQ_ACTIONS]
_LONG_INDEX = [ACTION_NAMES.index(a) for a in _LONG_ACTIONS]


def _advance(cfg: SyntheticConfig, states: _MemberStates, v: np.ndarray, drawn: np.ndarray) -> None:
    """Decay the first k ranked members' states by one impression and add the posts ``v`` (k, dim)
    just shown to them, where their drawn actions (k, actions) make them count."""
    k = len(v)
    updates = (
        (states.engaged, cfg.seq_decay, drawn[:, _SEQ_INDEX].any(axis=1)),
        (states.active, cfg.long_decay, drawn[:, _LONG_INDEX].any(axis=1)),
        (states.seen, cfg.fatigue_decay, None),
    )
    for state, decay, counts in updates:
        state[:k] *= decay
        state[:k] += v if counts is None else counts[:, None] * v
    states.active_weight[:k] *= cfg.long_decay
    states.active_weight[:k] += updates[1][2]


def _draw_actions(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    timeline: _Timeline,
    impression_vec: np.ndarray,
    static: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true probabilities (n, actions), drawn actions (n, actions) bool, history terms of the
    interest (n, len(HISTORY_TERMS))).

    The history states make a member's impression t depend on the actions drawn before it, so
    this walks t, advancing every member that has a t-th impression at once. Arrays are put in
    step-major order first so that each step works on contiguous slices.
    """
    n, num_actions = static.shape
    uniforms = rng.random((n, num_actions))  # drawn up front: results do not depend on the walk
    order, active = _step_major(timeline.counts)
    exposure = ((1.0 + timeline.positions) ** -cfg.position_exponent)[order, None]
    static, vecs, step_u = static[order], impression_vec[order], uniforms[order]
    weights = np.asarray(cfg.action_weights)
    probs = np.empty((n, num_actions))
    terms = np.empty((n, len(HISTORY_TERMS)))
    states = _MemberStates.zeros(len(timeline.counts), impression_vec.shape[1])
    lo = 0
    for num_active in active:
        hi = lo + num_active
        v = vecs[lo:hi]
        terms[lo:hi] = _history_terms(cfg, states, v)
        interest = terms[lo:hi].sum(axis=1, keepdims=True)
        probs[lo:hi] = exposure[lo:hi] * _sigmoid(static[lo:hi] + weights * interest)
        _advance(cfg, states, v, step_u[lo:hi] < probs[lo:hi])
        lo = hi
    member_major = np.empty_like(probs)
    member_major[order] = probs
    member_terms = np.empty_like(terms)
    member_terms[order] = terms
    return member_major, uniforms < member_major, member_terms


def probs_without(log, cfg: SyntheticConfig, terms: tuple[str, ...] | list[str]) -> np.ndarray:
    """(n, actions) the true probabilities of a log's impressions with the named history terms
    (of ``HISTORY_TERMS``) taken out of the interest: the oracle of a world, or of a model, that
    lacks those effects. ``log`` maps the impression log's columns (``position``,
    ``true_<action>``, ``term_<name>``) to arrays, e.g. those ``write_log`` wrote."""
    unknown = sorted(set(terms) - set(HISTORY_TERMS))
    if unknown:
        raise ValueError(f"unknown history term(s) {unknown}; known: {list(HISTORY_TERMS)}")
    exposure = (1.0 + np.asarray(log["position"], np.float64)) ** -cfg.position_exponent
    p = np.stack([np.asarray(log[TRUE_PROB_PREFIX + a], np.float64) for a in ACTION_NAMES], axis=1)
    # The log keeps float32: keep the inverted sigmoid finite at its ends.
    q = np.clip(p / exposure[:, None], 1e-12, 1 - 1e-7)
    removed = sum((np.asarray(log[TERM_PREFIX + t], np.float64) for t in terms), np.zeros(len(p)))
    logit = np.log(q) - np.log1p(-q) - np.asarray(cfg.action_weights) * removed[:, None]
    return exposure[:, None] * _sigmoid(logit)


def _post_content(rng: np.random.Generator, cfg: SyntheticConfig, catalog: _Catalog) -> np.ndarray:
    """(posts, dim) float32 the content embedding: the post's topic vector, blurred once per post
    as a content model would, so the same post always shows the same embedding."""
    noise = rng.normal(0.0, cfg.content_noise, catalog.post_vec.shape)
    return (catalog.post_vec + noise).astype(np.float32)


def _build_log(
    timeline: _Timeline,
    catalog: _Catalog,
    content: np.ndarray,
    posts: np.ndarray,
    probs: np.ndarray,
    actions: np.ndarray,
    terms: np.ndarray,
) -> pa.Table:
    """The flat impression log, one row per impression, in the raw form of any log;
    ``feedsr.prepare`` turns it into sequences. The ``term_*`` columns are ground truth beside the
    ``true_*`` ones, for ``probs_without``; no model input is made of them."""
    log = {
        "member_id": timeline.member,
        "post_id": posts,
        "author_id": catalog.post_author[posts],
        "timestamp": timeline.timestamps,
        "position": timeline.positions,
        **{name: actions[:, i].astype(np.int8) for i, name in enumerate(ACTION_NAMES)},
        "post_type": catalog.post_type[posts],
        "surface": timeline.surfaces,
        "post_quality": catalog.post_quality_obs[posts].astype(np.float32),
        "post_age": np.log1p(_age_hours(timeline, catalog, posts)).astype(np.float32),
        **{f"{CONTENT_PREFIX}{i}": content[posts, i] for i in range(content.shape[1])},
        **{TRUE_PROB_PREFIX + name: probs[:, i].astype(np.float32) for i, name in enumerate(ACTION_NAMES)},
        **{TERM_PREFIX + name: terms[:, i].astype(np.float32) for i, name in enumerate(HISTORY_TERMS)},
    }
    return pa.table(log)


def _splits(cfg: SyntheticConfig) -> list[Split]:
    """train / valid / test by whole days, oldest first."""
    train_days = cfg.num_days - cfg.valid_days - cfg.test_days
    bounds = np.cumsum([0, train_days, cfg.valid_days, cfg.test_days]) * DAY_S + cfg.start_time
    names = ("train", "valid", "test")
    return [Split(name, int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(names)]


def _make_config(params: dict) -> SyntheticConfig:
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown synthetic parameter(s) {unknown}; known: {sorted(known)}")
    return SyntheticConfig(**params)


def _check_int(name: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Simulation:
    """What ``write_log`` wrote: the parameters, the split boundaries and the files."""

    config: SyntheticConfig
    splits: list[Split]
    log_path: Path
    latents_path: Path


def write_log(out_dir: str | Path, num_members: int, seed: int, **params) -> Simulation:
    """Simulate and write the flat impression log ``out_dir/impressions.parquet`` and the latent
    vectors ``out_dir/latents.npz`` (for checks); ``params`` are ``SyntheticConfig`` fields. The
    same arguments always give the same files. ``feedsr.prepare.synthetic.generate`` turns the
    log into a dataset, the one path from log to sequences."""
    num_members = _check_int("num_members", num_members, 1)
    seed = _check_int("seed", seed, 0)
    cfg = _make_config(params)
    rng = np.random.default_rng(seed)

    catalog = _make_catalog(rng, cfg, num_members)
    member_vec, follows = _make_members(rng, cfg, num_members, catalog)
    timeline = _make_timeline(rng, cfg, num_members)
    posts = _pick_posts(rng, cfg, timeline, follows, catalog)
    static = _static_logits(cfg, timeline, member_vec, catalog, posts)
    probs, actions, terms = _draw_actions(rng, cfg, timeline, catalog.post_vec[posts], static)
    # Drawn last, so that switching content_noise on changes nothing else in the world.
    content = _post_content(rng, cfg, catalog)
    log = _build_log(timeline, catalog, content, posts, probs, actions, terms)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latents = out_dir / LATENTS_FILE
    np.savez(
        latents,
        member_vec=member_vec,
        author_vec=catalog.author_vec,
        post_vec=catalog.post_vec,
        post_content=content,
        post_author=catalog.post_author,
        post_quality=catalog.post_quality,
        post_type=catalog.post_type,
        post_created=catalog.post_created,
        type_effect=catalog.type_effect,
        follows=follows,
    )
    path = out_dir / LOG_FILE
    pq.write_table(log, path, row_group_size=1 << 20)
    return Simulation(cfg, _splits(cfg), path, latents)


def config_dict(cfg: SyntheticConfig) -> dict:
    """The parameters as JSON values (lists, not tuples, so they equal dataset.json read back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def load_targets(data_dir: str | Path, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    """The target impressions of one split as flat arrays, one per requested column.

    Per-impression columns give their target values; ``member_id`` is repeated per target. Reads
    the whole split into memory: meant for checking generated data, not for training.
    """
    files = sorted(Path(data_dir, split).glob("part-*.parquet"))
    if not files:
        raise ValueError(f"no part-*.parquet files under {Path(data_dir, split)}")
    table = pq.read_table(files, columns=list(dict.fromkeys(["item_ids", "num_targets", *columns])))
    lengths = pc.list_value_length(table["item_ids"]).to_numpy()
    num_targets = table["num_targets"].to_numpy()
    row = np.repeat(np.arange(len(lengths)), lengths)
    index_in_row = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    is_target = index_in_row >= (lengths - num_targets)[row]
    out = {}
    for name in columns:
        if name == "member_id":
            out[name] = np.repeat(table[name].to_numpy(), num_targets)
        else:
            out[name] = pc.list_flatten(table[name]).to_numpy()[is_target]
    return out
