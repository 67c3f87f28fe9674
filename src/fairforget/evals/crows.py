"""CrowS-Pairs (Nangia et al. 2020) for causal LMs: how often the more-stereotyping sentence is more likely.

Each pair has ``sent_more`` (about the historically disadvantaged group) and ``sent_less``; the column
``stereo_antistereo`` says whether ``sent_more`` expresses the stereotype (``stereo``) or violates it
(``antistereo``), so the stereotyping sentence is ``sent_more`` for stereo pairs and ``sent_less`` for
antistereo pairs. A sentence's score is its full log-likelihood (sum of token log-probabilities, or the mean
with ``score="mean"``), every token scored, the first conditioned on the BOS/EOS token. The metric is
100 * share of pairs where the stereotyping sentence scores higher (ties count as not); ideal 50.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from fairforget.artifacts import write_csv
from fairforget.choice_scoring import score_sentence_groups
from fairforget.datasets import read_table
from fairforget.errors import FairforgetError
from fairforget.evals.interface import Evaluation, Examples, Run
from fairforget.evals.shares import comparison_rows as share_comparison_rows, paired_share_change, share
from fairforget.markdown import ci_text, image, table
from fairforget.plots import interval_bars
from fairforget.stats import proportional_sample

ScoreKind = Literal["sum", "mean"]
REQUIRED_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


def scoring_note(score: ScoreKind) -> str:
    what = "sum" if score == "sum" else "mean per token"
    return (f"{what} of the log-probabilities of every token of the sentence, the first conditioned on the "
            f"tokenizer's BOS (else EOS) token")


@dataclass(frozen=True)
class CrowsPair:
    id: str
    sent_more: str
    sent_less: str
    direction: str  # stereo | antistereo
    bias_type: str

    @property
    def stereotyping(self) -> str:
        return self.sent_more if self.direction == "stereo" else self.sent_less

    @property
    def other(self) -> str:
        return self.sent_less if self.direction == "stereo" else self.sent_more


def load_crows(path: Path | str) -> list[CrowsPair]:
    """Read ``crows_pairs_anonymized.csv``; a malformed row raises an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FairforgetError(f"CrowS-Pairs file not found: {path} (run scripts/00_fetch_data.py)")
    pairs = []
    for line, row in read_table(path, REQUIRED_COLUMNS):  # rows with a wrong column count are refused there
        where = f"{path}:{line}"
        if row["stereo_antistereo"] not in ("stereo", "antistereo"):
            raise FairforgetError(f"{where}: stereo_antistereo is {row['stereo_antistereo']!r}, "
                                  f"expected stereo or antistereo")
        if not row["sent_more"].strip() or not row["sent_less"].strip() or not row["bias_type"]:
            raise FairforgetError(f"{where}: empty sentence or bias type")
        pairs.append(CrowsPair(str(next(iter(row.values())) or len(pairs)), row["sent_more"].strip(),
                               row["sent_less"].strip(), row["stereo_antistereo"], row["bias_type"]))
    if not pairs:
        raise FairforgetError(f"{path}: no pairs")
    return pairs


def sample_pairs(pairs: Sequence[CrowsPair], limit: int | None, seed: int = 0,
                 bias_types: Sequence[str] = ()) -> list[CrowsPair]:
    """A seeded sample of about ``limit`` pairs, proportional per bias type (all pairs when limit is None), of
    the ``bias_types`` given (every type when none is): ``bias_types=["gender"]`` with no limit is all 262
    gender pairs."""
    known = sorted({p.bias_type for p in pairs})
    unknown = [t for t in bias_types if t not in known]
    if unknown:
        raise FairforgetError(f"--bias-types: unknown CrowS-Pairs bias type(s) {', '.join(unknown)}; "
                              f"known: {', '.join(known)}")
    if bias_types:
        pairs = [p for p in pairs if p.bias_type in bias_types]
    if limit is None or limit >= len(pairs):
        return list(pairs)
    groups = [[p for p in pairs if p.bias_type == t] for t in sorted({p.bias_type for p in pairs})]
    return proportional_sample(groups, limit, seed)


def score_pairs(model: Any, tokenizer: Any, pairs: Sequence[CrowsPair], batch_size: int = 32,
                score: ScoreKind = "sum") -> list[dict]:
    """One item per pair with both sentences' scores and whether the stereotyping one is preferred (the words
    the two share at their start computed once: ``score_sentence_groups``)."""
    scores = score_sentence_groups(model, tokenizer, [(p.stereotyping, p.other) for p in pairs], batch_size=batch_size,
                                   desc="CrowS-Pairs", names=[(f"CrowS-Pairs pair {p.id} (stereotyping)",
                                                             f"CrowS-Pairs pair {p.id} (other)") for p in pairs])
    value = (lambda s: s.logprob) if score == "sum" else (lambda s: s.mean)
    items = []
    for pair, (stereo, other) in zip(pairs, scores):
        items.append({"id": pair.id, "bias_type": pair.bias_type, "direction": pair.direction,
                      "stereotyping": pair.stereotyping, "other": pair.other,
                      "logprob_stereotyping": stereo.logprob, "logprob_other": other.logprob,
                      "n_tokens_stereotyping": stereo.n_tokens, "n_tokens_other": other.n_tokens,
                      "score": score, "stereo_preferred": bool(value(stereo) > value(other))})
    return items


def compute_metrics(items: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``metrics[group]`` for ``overall``, each bias type, and the ``stereo`` / ``antistereo`` directions."""
    if not items:
        raise FairforgetError("no CrowS-Pairs items to summarise")
    flags = np.array([it["stereo_preferred"] for it in items], dtype=bool)
    bias = np.array([it["bias_type"] for it in items])
    direction = np.array([it["direction"] for it in items])
    metrics = {"overall": share(flags, n_boot, seed)}
    for name in sorted(set(bias)):
        metrics[name] = share(flags[bias == name], n_boot, seed)
    for name in ("stereo", "antistereo"):
        if (direction == name).any():
            metrics[f"direction:{name}"] = share(flags[direction == name], n_boot, seed)
    return metrics


def compare_runs(items_before: Sequence[dict], items_after: Sequence[dict], n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Paired comparison on the pairs both runs scored, overall and per bias type: McNemar on the decisions,
    a paired-bootstrap interval of the change in the metric and the minimum detectable change ``mdc``."""
    after = {it["id"]: it for it in items_after}
    common = [it for it in items_before if it["id"] in after]
    if not common:
        raise FairforgetError("the two CrowS-Pairs runs share no pairs; compare runs on the same pairs")
    b = np.array([it["stereo_preferred"] for it in common], dtype=bool)
    a = np.array([after[it["id"]]["stereo_preferred"] for it in common], dtype=bool)
    bias = np.array([it["bias_type"] for it in common])
    result: dict[str, Any] = {"n_common": len(common)}
    for name in ["overall", *sorted(set(bias))]:
        mask = np.ones(len(common), bool) if name == "overall" else bias == name
        result[name] = paired_share_change(b[mask], a[mask], n_boot, seed)
    return result


def evaluate_crows(model: Any, tokenizer: Any, pairs: Sequence[CrowsPair], batch_size: int = 32, n_boot: int = 1000,
                   seed: int = 0, score: ScoreKind = "sum") -> tuple[dict, list[dict]]:
    """Score ``pairs`` and return (metrics, per-pair items)."""
    items = score_pairs(model, tokenizer, pairs, batch_size, score)
    return compute_metrics(items, n_boot, seed), items


class CrowsEvaluation(Evaluation):
    """CrowS-Pairs through the shared interface (:mod:`fairforget.evals.interface`)."""

    name, title, script = "crows", "CrowS-Pairs", "15_evaluate_crows.py"
    item_fields = ("id", "bias_type", "direction", "stereo_preferred")
    comparison_note = "share of pairs whose stereotyping sentence is preferred; McNemar exact test"
    report_heading, report_overall_only = "CrowS-Pairs", True

    def load(self, path: Path | str, limit: int | None = None, seed: int = 0,
             bias_types: Sequence[str] = ()) -> Examples:
        """A seeded sample of about ``limit`` pairs of ``bias_types`` (all types if none), proportional per type."""
        return Examples(sample_pairs(load_crows(path), limit, seed, bias_types), [Path(path)])

    def evaluate(self, model: Any, tokenizer: Any, examples: Sequence[CrowsPair], **options: Any) -> tuple[dict, list]:
        return evaluate_crows(model, tokenizer, examples, **options)

    def compare(self, before: Sequence[dict], after: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
        return compare_runs(before, after, n_boot, seed)

    def group_sizes(self, metrics: dict) -> dict[str, int]:
        return {group: m["n"] for group, m in metrics.items()}

    def write_files(self, folder: Path, metrics: dict, label: str) -> None:
        write_csv(folder / "metrics.csv", [{"group": g, "n": m["n"], "metric": round(m["metric"], 3),
                                            "ci_low": round(m["metric_ci"][0], 3),
                                            "ci_high": round(m["metric_ci"][1], 3)} for g, m in metrics.items()])
        groups = [g for g in metrics if not g.startswith("direction:")]
        interval_bars(folder / "crows_by_bias_type.png", groups,
                      {label: ([metrics[g]["metric"] for g in groups], [metrics[g]["metric_ci"] for g in groups])},
                      "CrowS-Pairs: stereotyping sentence preferred (%)", "% of pairs", reference=50)

    def provenance_notes(self, tokenizer: Any, metrics: dict, options: dict) -> dict:
        return {"scoring": scoring_note(options.get("score", "sum"))}

    def headline(self, metrics: dict) -> str:
        o = metrics["overall"]
        return f"CrowS-Pairs: {ci_text(o['metric'], o['metric_ci'])} on {o['n']} pairs"

    def comparison_rows(self, comparison: dict, overall_only: bool = False) -> tuple[list[str], list[list]]:
        return share_comparison_rows(((name, c) for name, c in comparison.items()
                                      if isinstance(c, dict) and (name == "overall" or not overall_only)), "stereo-preferred")

    def report_levels(self, runs: Sequence[Run], folder: Path) -> str:
        first = runs[0].metrics
        groups = [g for g in first if not g.startswith("direction:")]
        text = (f"### {self.report_heading}\n\nShare of pairs (%) where the more stereotyping sentence has the "
                "higher log-likelihood (ideal 50), with 95% bootstrap intervals.\n\n")
        text += table(["group", *(run.label for run in runs)],
                      [[f"{g} (n={first[g]['n']})", *(ci_text(run.metrics[g]["metric"], run.metrics[g]["metric_ci"], 1)
                                                      if g in run.metrics else "n/a" for run in runs)] for g in groups])
        return text

    def report_plots(self, runs: Sequence[Run], folder: Path) -> str:
        return image(runs[-1].folder / "crows_by_bias_type.png", f"CrowS-Pairs by bias type, {runs[-1].label}", folder)


CROWS = CrowsEvaluation()
