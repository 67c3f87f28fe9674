"""Perplexity on a neutral held-out text set that ships offline with Python itself.

Source: ``pydoc_data.topics`` of the Python standard library (the Python Language Reference topics that
``help()`` shows, PSF licence, one copy in every CPython install). Its prose paragraphs (not code, not
indented) of ``min_words``..``max_words`` words, with no gendered word, deduplicated, are split by a stable
hash of their text into two disjoint halves: ``retain`` (for training-time retain terms) and ``heldout``
(for measuring perplexity). The text is technical English, not bias-evaluation material; it depends on the
Python version, so results record its version and the sha256 of the texts used.

:data:`PERPLEXITY` puts it behind the evaluation interface (a capability measure: the level with its bootstrap
interval, and a paired relative change between two models on the same texts); it has no stage of its own, the
held-out suite (:mod:`fairforget.evals.suite`) scores it beside the bias evaluations.
"""

from __future__ import annotations

import hashlib
import math
import platform
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from fairforget.artifacts import write_csv
from fairforget.errors import FairforgetError
from fairforget.evals.interface import Evaluation, Examples, Run
from fairforget.markdown import ci_text, table
from fairforget.plots import interval_bars
from fairforget.scoring import encode, score_encoded
from fairforget.stats import bootstrap_ci

Split = Literal["heldout", "retain", "all"]
NEUTRAL_SOURCE = "pydoc_data.topics (Python Language Reference topics shipped with CPython)"
GENDERED = re.compile(r"\b(he|she|him|her|his|hers|himself|herself|man|men|woman|women|male|female|boy|girl|"
                      r"mother|father|husband|wife|son|daughter|brother|sister|gentlem[ae]n|lady|ladies)\b",
                      re.IGNORECASE)


def _paragraphs(min_words: int, max_words: int) -> list[str]:
    from pydoc_data.topics import topics

    seen, kept = set(), []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            if not block.strip() or block[:1].isspace():  # indented blocks are code, grammar or tables
                continue
            text = " ".join(block.split())
            n_words = len(text.split())
            if min_words <= n_words <= max_words and not GENDERED.search(text) and text not in seen:
                seen.add(text)
                kept.append(text)
    return kept


def _half(text: str) -> str:
    return "retain" if hashlib.sha256(text.encode("utf-8")).digest()[0] % 2 else "heldout"


def load_neutral_texts(split: Split = "heldout", limit: int | None = None, min_words: int = 12,
                       max_words: int = 80) -> list[str]:
    """Neutral paragraphs of one half (``heldout`` / ``retain``, disjoint) or ``all``, in a fixed order.

    ``limit`` keeps the first N of that order (sorted by hash of the text, so a prefix is a fixed sample).
    """
    if split not in ("heldout", "retain", "all"):
        raise FairforgetError(f"unknown neutral-text split {split!r}: use heldout, retain or all")
    if limit is not None and limit < 1:
        raise FairforgetError(f"neutral-text limit must be at least 1, got {limit}")
    texts = [t for t in _paragraphs(min_words, max_words) if split == "all" or _half(t) == split]
    texts.sort(key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
    if not texts:
        raise FairforgetError(f"no neutral texts of {min_words}-{max_words} words in {NEUTRAL_SOURCE}")
    return texts[:limit] if limit is not None else texts


def texts_provenance(texts: Sequence[str]) -> dict[str, Any]:
    """Where the texts came from and a digest that pins exactly which ones were used."""
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return {"source": NEUTRAL_SOURCE, "python_version": platform.python_version(), "n_texts": len(texts),
            "sha256": digest}


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, n_boot: int = 1000,
               seed: int = 0) -> dict[str, Any]:
    """Token-level perplexity exp(total NLL / total tokens) of ``texts`` (each conditioned on BOS/EOS) with a
    percentile-bootstrap 95% interval over texts, plus the per-text NLL sums for paired comparisons."""
    if not texts:
        raise FairforgetError("perplexity needs at least one text")
    encoded = [encode(tokenizer, "", text) for text in texts]
    scores = score_encoded(model, encoded, tokenizer.pad_token_id, batch_size)
    nll = np.array([-s.logprob for s in scores])
    tokens = np.array([s.n_tokens for s in scores], dtype=float)
    interval = bootstrap_ci(lambda idx: math.exp(nll[idx].sum() / tokens[idx].sum()), len(texts), n_boot=n_boot,
                            seed=seed)
    return {"perplexity": math.exp(nll.sum() / tokens.sum()), "perplexity_ci": [float(v) for v in interval],
            "nll_per_token": float(nll.sum() / tokens.sum()), "n_texts": len(texts), "n_tokens": int(tokens.sum()),
            "batch_size": batch_size, "per_text_nll": nll.tolist(), "per_text_tokens": tokens.astype(int).tolist()}


def per_text_items(result: dict[str, Any]) -> list[dict]:
    """One item per text of a :func:`perplexity` result: its NLL sum and token count (what pairing needs)."""
    return [{"index": i, "nll": nll, "n_tokens": n}
            for i, (nll, n) in enumerate(zip(result["per_text_nll"], result["per_text_tokens"]))]


def perplexity_change(before: dict[str, Any], after: dict[str, Any], n_boot: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Relative perplexity change (after / before - 1, in %) on the same texts, with a paired bootstrap interval."""
    nb, na = np.array(before["per_text_nll"]), np.array(after["per_text_nll"])
    tokens = np.array(before["per_text_tokens"], dtype=float)
    if nb.shape != na.shape or list(before["per_text_tokens"]) != list(after["per_text_tokens"]):
        raise FairforgetError("perplexity runs to compare must score the same texts with the same tokenizer")

    def change(idx: np.ndarray) -> float:
        return 100.0 * (math.exp((na[idx].sum() - nb[idx].sum()) / tokens[idx].sum()) - 1.0)

    return {"ppl_change_pct": change(np.arange(len(nb))),
            "ppl_change_pct_ci": [float(v) for v in bootstrap_ci(change, len(nb), n_boot=n_boot, seed=seed)]}


class PerplexityEvaluation(Evaluation):
    """Perplexity on the neutral held-out texts: ``load`` gives the texts, ``evaluate`` (metrics = the
    :func:`perplexity` result, items = per-text NLL), ``compare`` the paired relative change."""

    name, title, script = "perplexity", "Perplexity (neutral held-out texts)", ""  # scored by the suite only
    item_fields = ("index", "nll", "n_tokens")
    comparison_note = "relative perplexity change on the same texts, paired bootstrap over texts"
    report_heading, report_overall_only = "Perplexity", True

    def load(self, path: Path | str | None = None, split: Split = "heldout", limit: int | None = None) -> Examples:
        """The first ``limit`` neutral texts of ``split`` (``path`` is unused: the texts ship with Python)."""
        texts = load_neutral_texts(split, limit)
        return Examples(texts, [], {"texts": texts_provenance(texts)})

    def evaluate(self, model: Any, tokenizer: Any, examples: Sequence[str], **options: Any) -> tuple[dict, list]:
        result = perplexity(model, tokenizer, examples, **options)
        return result, per_text_items(result)

    def compare(self, before: Sequence[dict], after: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
        """``{"overall": perplexity_change(...), "n_common": texts}`` (a capability measure: no decisions flip, so
        no McNemar test)."""
        def as_result(items: Sequence[dict]) -> dict:
            return {"per_text_nll": [it["nll"] for it in items], "per_text_tokens": [it["n_tokens"] for it in items]}
        return {"overall": perplexity_change(as_result(before), as_result(after), n_boot, seed), "n_common": len(before)}

    def group_sizes(self, metrics: dict) -> dict[str, int]:
        return {"overall": metrics["n_texts"]}

    def write_files(self, folder: Path, metrics: dict, label: str) -> None:
        """metrics.csv and perplexity.png (the level with its 95% interval)."""
        write_csv(folder / "metrics.csv", [{k: v for k, v in metrics.items() if not k.startswith("per_text")}])
        interval_bars(folder / "perplexity.png", ["neutral held-out"],
                      {"perplexity": ([metrics["perplexity"]], [metrics["perplexity_ci"]])}, f"Perplexity, {label}",
                      "perplexity (95% CI)")

    def provenance_notes(self, tokenizer: Any, metrics: dict, options: dict) -> dict:
        return {"scoring": "exp(total NLL / total tokens), each text conditioned on BOS/EOS", "source": NEUTRAL_SOURCE}

    def headline(self, metrics: dict) -> str:
        return (f"perplexity {ci_text(metrics['perplexity'], metrics['perplexity_ci'])} on {metrics['n_texts']} texts "
                f"({metrics['n_tokens']} tokens)")

    def comparison_rows(self, comparison: dict, overall_only: bool = False) -> tuple[list[str], list[list]]:
        c = comparison["overall"]
        return ["group", "texts", "perplexity change % [95% CI]"], [
            ["overall", comparison["n_common"], ci_text(c["ppl_change_pct"], c["ppl_change_pct_ci"], signed=True)]]

    def report_levels(self, runs: Sequence[Run], folder: Path) -> str:
        rows = [[run.label, run.metrics["n_texts"], ci_text(run.metrics["perplexity"], run.metrics["perplexity_ci"])]
                for run in runs]
        return f"### {self.report_heading}\n\n" + table(["model", "texts", "perplexity"], rows)


PERPLEXITY = PerplexityEvaluation()
