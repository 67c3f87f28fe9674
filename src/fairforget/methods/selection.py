"""The score a method's setting is chosen by: |SS - 50| on a seeded sample of the StereoSet *selection* half.

The held-out half (``select_half(..., "heldout")``) is what the comparison reports; it is never used here.
With ``metric="gender"`` the sample is drawn from the gender examples of the selection half only, so a
small sample still holds enough gender examples to choose by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from fairforget.evals.stereoset import Example, evaluate_stereoset, load_stereoset, select_half, stratified_limit

Metric = Literal["overall", "gender"]


def selection_examples(path: Path | str, metric: Metric, limit: int | None, half_seed: int = 0,
                       seed: int = 0) -> list[Example]:
    """The selection-half examples a setting is chosen on (gender examples only for ``metric="gender"``)."""
    examples = select_half(load_stereoset(path), "selection", half_seed)
    if metric == "gender":
        examples = [e for e in examples if e.bias_type == "gender"]
    return stratified_limit(examples, limit, seed)


def selection_score(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 32,
                    n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """SS, its interval, LMS and |SS - 50| of ``model`` on the selection examples (all of them pooled)."""
    metrics, _ = evaluate_stereoset(model, tokenizer, examples, batch_size, n_boot, seed)
    overall = metrics["overall"]["all"]
    return {"ss": overall["ss"], "ss_ci": overall["ss_ci"], "lms": overall["lms"],
            "distance_from_50": abs(overall["ss"] - 50.0), "n_examples": len(examples)}


def choose(rows: Sequence[dict], key: str, max_lms_drop: float | None, reference_lms: float) -> dict:
    """The row with the smallest |SS - 50| whose LMS is at most ``max_lms_drop`` below ``reference_lms``
    (every row when none qualifies, or when ``max_lms_drop`` is None); ties keep the first row (``key`` order)."""
    allowed = [r for r in rows if max_lms_drop is None or reference_lms - r["lms"] <= max_lms_drop] or list(rows)
    return min(allowed, key=lambda r: (r["distance_from_50"], abs(r[key])))
