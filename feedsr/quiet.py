"""Silence library messages that fire on every run and that users cannot act on.

TorchRec's planner, FBGEMM and torch.fx print warnings about their own internals (deprecations,
dry-run estimates, tracing APIs) at every start and in every loader worker; feedsr prints its own
progress. Real errors still surface as exceptions.
"""

from __future__ import annotations

import logging
import warnings

_MESSAGES = (
    "is_fx_tracing will return true",
    "`broadcast_buffers` is deprecated",
    "HeuristicalStorageReservation is known to cause issues",
)
_LOGGERS = ("torchrec.distributed.planner", "torch.fx._symbolic_trace", "torchrec.distributed")


def quiet_libraries() -> None:
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="fbgemm_gpu")
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
