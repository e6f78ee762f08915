"""Serving-side scoring: many candidates per member over one shared history (SPEC section 6)."""

from feedsr.serve.candidates import Candidates
from feedsr.serve.scorer import METHODS, CandidateScorer, HistoryCache

__all__ = ["METHODS", "CandidateScorer", "Candidates", "HistoryCache"]
