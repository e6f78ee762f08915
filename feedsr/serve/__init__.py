"""Serving-side scoring: many candidates per member over one shared history (SPEC section 6).

Names are imported on first use, so that ``feedsr.serve.exported`` (scoring with compiled
programs) runs without importing the model code.
"""

__all__ = ["METHODS", "CandidateScorer", "Candidates", "HistoryCache"]


def __getattr__(name: str):
    if name in ("METHODS", "CandidateScorer", "HistoryCache"):
        from feedsr.serve import scorer

        return getattr(scorer, name)
    if name == "Candidates":
        from feedsr.serve.candidates import Candidates

        return Candidates
    raise AttributeError(f"module 'feedsr.serve' has no attribute '{name}'")
