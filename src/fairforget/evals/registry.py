"""Every evaluation behind the one interface (:mod:`fairforget.evals.interface`), by name; the report and the
method comparison loop over it."""

from __future__ import annotations

from fairforget.errors import FairforgetError
from fairforget.evals.bbq_eval import BBQ
from fairforget.evals.crows import CROWS
from fairforget.evals.interface import Evaluation
from fairforget.evals.perplexity import PERPLEXITY
from fairforget.evals.stereoset import STEREOSET
from fairforget.evals.winobias import WINOBIAS

EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (STEREOSET, CROWS, BBQ, WINOBIAS, PERPLEXITY)}


def evaluation(name: str) -> Evaluation:
    """The registered evaluation called ``name``."""
    if name not in EVALUATIONS:
        raise FairforgetError(f"unknown evaluation {name!r}; known: {', '.join(EVALUATIONS)}")
    return EVALUATIONS[name]
