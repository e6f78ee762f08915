"""Score with the exported programs of ``feedsr/serve/export.py``, without the model code.

This module imports torch, numpy and the data layer's plain classes only (the request reader and
the calibration come from ``feedsr.data`` / ``feedsr.eval.calibration``): the model is the
compiled programs in the export folder, loaded with ``torch._inductor.aoti_load_package``.

Example::

    scorer = ExportedScorer("exported/")
    cache = scorer.encode(history)                    # one member: dict of its (L,) columns
    probs = scorer.score(cache, candidates, request_time)   # (N, K) numpy, calibrated if exported so
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feedsr.data.batch import BatchSpec
from feedsr.data.reader import ReadSpec
from feedsr.data.schema import CONTEXT_PREFIX, DENSE_PREFIX, UNKNOWN_POSITION
from feedsr.data.tasks import Task
from feedsr.eval.calibration import Calibration

# The files of an export folder (written by feedsr/serve/export.py).
HISTORY_PROGRAM, CANDIDATE_PROGRAM, EXPORT_META = "history.pt2", "candidates.pt2", "export.json"


@dataclass
class ExportedCache:
    """One member's keys and values (L layers' keys, then values; attnmvp: then AttnLFA's), its
    history length and first timestamp (the candidates' impression index and RoPE time origin)."""

    kv: tuple[torch.Tensor, ...]
    length: int
    origin: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


class ExportedScorer:
    """The two compiled programs of an export folder and its ``export.json``."""

    def __init__(self, directory: str | Path, device: str = "cpu"):
        directory = Path(directory)
        meta_path = directory / EXPORT_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: no {EXPORT_META}: not a folder written by "
                                    "`python -m feedsr.serve export`")
        self._setup(json.loads(meta_path.read_text()),
                    torch._inductor.aoti_load_package(str(directory / HISTORY_PROGRAM)),
                    torch._inductor.aoti_load_package(str(directory / CANDIDATE_PROGRAM)), device, str(meta_path))

    @classmethod
    def of_programs(cls, meta: dict, history_program, candidate_program, device: str = "cpu") -> ExportedScorer:
        """The runner over programs held in memory instead of an export folder's: callables with
        the compiled programs' inputs and outputs, e.g. ``torch.export``'s traced programs
        (``ExportedProgram.module()``, ``export.trace``) to check them without compiling."""
        scorer = cls.__new__(cls)
        scorer._setup(meta, history_program, candidate_program, device, "the export meta")
        return scorer

    def _setup(self, meta: dict, history_program, candidate_program, device: str, source: str) -> None:
        self.meta = meta
        self.device = torch.device(device)
        self.history_program, self.candidate_program = history_program, candidate_program
        self.features, self.context = self.meta["id_features"], self.meta["context"]
        self.dense = self.meta.get("dense", [])  # exports made before dense features: none
        self.tasks = [t["name"] for t in self.meta["tasks"]]
        self.tokens_per_impression = self.meta.get("tokens_per_impression", 2)  # older exports: interleaved
        record = self.meta.get("calibration")
        self.calibration = None if record is None else Calibration.from_dict(record, source)

    @property
    def spec(self) -> BatchSpec:
        """The BatchSpec of the exported model's inputs (to read requests with)."""
        m = self.meta
        read = ReadSpec(tuple(m["action_names"]), tuple(m["categorical"]), tuple(m["context"]),
                        dense=tuple(self.dense))
        tasks = tuple(Task(t["name"], tuple(t["actions"]), t["group"]) for t in m["tasks"])
        return BatchSpec(read, tasks, dict(m["id_table_sizes"]), m["session_gap_s"])

    def _tensor(self, values: np.ndarray, dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(values)).to(self.device, dtype)

    def _ids(self, columns: dict[str, np.ndarray]) -> torch.Tensor:
        return self._tensor(np.stack([np.asarray(columns[f], np.int64) for f in self.features])[:, None], torch.int64)

    def _numbers(self, columns: dict[str, np.ndarray], n: int) -> torch.Tensor:
        """(1, n, C + E): the context features, then the dense ones (the programs' one input)."""
        names = [CONTEXT_PREFIX + c for c in self.context] + [DENSE_PREFIX + c for c in self.dense]
        values = [np.asarray(columns[c], np.float32) for c in names]
        stacked = np.stack(values, axis=1) if values else np.zeros((n, 0), np.float32)
        return self._tensor(stacked[None], torch.float32)

    def encode(self, history: dict[str, np.ndarray]) -> ExportedCache:
        """One member's history, oldest first: ``timestamps``, ``action_bits``, every id feature,
        ``dense_<name>`` and ``ctx_<name>`` as (L,) arrays; at most ``max_history`` impressions
        (the newest are kept).

        A one-impression history is encoded with a copy of it appended (the program takes >= 2):
        the history attends causally, so the first impression's keys and values do not see the
        copy, whose are then cut."""
        length = len(history["timestamps"])
        if length < 1:
            raise ValueError("a history needs at least one impression")
        keep = slice(max(0, length - self.meta["max_history"]), length)
        columns = {k: np.asarray(v)[keep] for k, v in history.items()}
        length = len(columns["timestamps"])
        if length < self.meta["min_history"]:
            columns = {k: np.concatenate([v, v[-1:]]) for k, v in columns.items()}
        with torch.inference_mode():
            kv = self.history_program(self._ids(columns), self._tensor(columns["action_bits"][None], torch.int64),
                                      self._numbers(columns, len(columns["timestamps"])),
                                      self._tensor(columns["timestamps"][None], torch.int64))
        # contiguous, as the candidate program was traced with (see HistoryProgram)
        tokens = self.tokens_per_impression * length
        return ExportedCache(tuple(t[:, :, :tokens].contiguous() for t in kv), length,
                             int(columns["timestamps"][0]))

    def score(self, cache: ExportedCache, candidates: dict[str, np.ndarray], request_time: int) -> np.ndarray:
        """(N, K) probabilities of N candidates (every id feature, ``dense_<name>`` and
        ``ctx_<name>`` as (N,) arrays, optionally ``positions``) shown at ``request_time``;
        calibrated when the export holds a calibration."""
        n = len(candidates[self.features[0]])
        positions = np.asarray(candidates.get("positions", np.full(n, UNKNOWN_POSITION)), np.int64)
        with torch.inference_mode():
            probs = self.candidate_program(
                self._ids(candidates), self._numbers(candidates, n), self._tensor(positions[None], torch.int64),
                self._tensor(np.array([cache.length]), torch.int64),
                self._tensor(np.array([request_time]), torch.int64),
                self._tensor(np.array([cache.origin]), torch.int64), *cache.kv)
        probs = probs[0].double().cpu().numpy()
        return probs if self.calibration is None else self.calibration.apply(probs, self.tasks)
