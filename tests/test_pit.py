"""Point-in-time counting: strictly earlier events per key, never a same-time tie."""

from __future__ import annotations

import numpy as np

from feedsr.data.pit import counts_before


def brute_force(keys: list[np.ndarray], times: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros_like(values)
    for i in range(len(times)):
        same = np.ones(len(times), dtype=bool)
        for key in keys:
            same &= key == key[i]
        out[i] = values[same & (times < times[i])].sum(axis=0)
    return out


def test_events_sharing_a_time_never_see_each_other():
    keys = [np.array([7, 7, 7, 7, 3, 7])]
    times = np.array([10, 20, 20, 30, 20, 20])
    clicks = np.array([[1], [1], [0], [1], [1], [1]])
    # Key 7: t=10 sees nothing; the three t=20 rows see only t=10; t=30 sees all four earlier.
    np.testing.assert_array_equal(counts_before(keys, times, clicks)[:, 0], [0, 1, 1, 3, 0, 1])
    np.testing.assert_array_equal(counts_before([], times, clicks)[:, 0], [0, 1, 1, 4, 1, 1])


def test_matches_brute_force_with_many_ties_in_any_row_order():
    rng = np.random.default_rng(0)
    n = 400
    member, author = rng.integers(0, 5, n), rng.integers(0, 4, n)
    times = rng.integers(0, 30, n)  # ~13 events per time: ties inside most (member, author) keys
    values = rng.integers(0, 3, (n, 2))
    for keys in ([], [member], [member, author]):
        np.testing.assert_array_equal(counts_before(keys, times, values),
                                      brute_force(keys, times, values))


def test_no_events():
    empty = np.array([], dtype=np.int64)
    assert counts_before([empty], empty, np.zeros((0, 3), np.int64)).shape == (0, 3)
