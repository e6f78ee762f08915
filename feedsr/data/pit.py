"""Point-in-time counting: what was known about a key strictly before each event.

Context features built from the log itself (a video's impressions so far, a member's clicks on an
author so far) must not see the event they describe, nor anything at or after its time. Both data
sources (the synthetic generator and the KuaiRand converter) count through ``counts_before``, so
the "strictly earlier" rule exists once.
"""

from __future__ import annotations

import numpy as np


def counts_before(keys: list[np.ndarray], times: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(n, k): per event, the sum of ``values`` (n, k) over the events with the same ``keys`` and a
    strictly smaller time. No keys means one group (global counts).

    Events that share a time never see each other: whatever order they are stored in, none of them
    happened before the others as far as the log can tell.

    Example::

        counts_before([np.array([7, 7, 7, 3])], np.array([10, 20, 20, 20]), np.ones((4, 1)))
        # -> [[0], [1], [1], [0]]: both events of key 7 at t=20 see only the one at t=10
    """
    n = len(times)
    order = np.lexsort((times, *reversed(keys)))
    new_group = np.zeros(n, dtype=bool)
    new_group[:1] = True
    for key in keys:
        k = key[order]
        new_group[1:] |= k[1:] != k[:-1]
    t = times[order]
    new_run = new_group.copy()  # a run: the events of one group at one time
    new_run[1:] |= t[1:] != t[:-1]
    index = np.arange(n)
    group_first = np.maximum.accumulate(np.where(new_group, index, 0))
    run_first = np.maximum.accumulate(np.where(new_run, index, 0))
    v = values[order]
    # An exclusive running sum read at a run's first event counts everything sorted before the
    # run and none of its ties; subtracting it at the group's first event leaves the group's own.
    exclusive = np.cumsum(v, axis=0) - v
    out = np.empty_like(v)
    out[order] = exclusive[run_first] - exclusive[group_first]
    return out
