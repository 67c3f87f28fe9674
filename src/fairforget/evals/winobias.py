"""WinoBias pair likelihood (Zhao et al. 2018) for causal LMs: how often the pro-stereotyped sentence is more likely.

Each pair is one line of the shipped test files in its two versions: pro-stereotyped (the pronoun matches the
stereotyped gender of the occupation it refers to) and anti-stereotyped (the other pronoun). Type 1 sentences
are resolved by world knowledge ("The janitor reprimanded the accountant because she made a mistake"), type 2
by syntax ("The accountant met the janitor and wished him well"); 396 lines each. The metric is 100 x the
share of pairs whose pro-stereotyped sentence has the higher log-likelihood (ties count as not); 50 is ideal.

Score: the sum of the log-probabilities of every token of the sentence (the CrowS-Pairs rule). The two
sentences are the same words but the pronoun, so the difference of the sums is the log likelihood ratio of
the two sentences: the pronoun's own log-probability and its effect on every later token. The mean per token
ranks them the same when both pronouns are one token; where token counts differ it would reward a sentence
for its length, not its pronoun. The rule goes into every item (``score``) and the provenance.

Minimal pairs: a few shipped lines are not minimal pairs (the anti-stereotyped line adds, drops or swaps
other words, or is another sentence). ``pairs="minimal"`` (default) leaves them out and lists their ids in
the metrics (``excluded_not_minimal``); ``pairs="all"`` scores all 792.

Clusters: each occupation pair (e.g. accountant + janitor) occurs in four lines, two of each type, once with
each occupation as the referent. Those pairs share words and stereotypes, so every interval is a cluster
bootstrap over occupation pairs, and the minimum detectable change of a comparison is the cluster-robust one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from fairforget.artifacts import write_csv
from fairforget.choice_scoring import score_sentence_groups
from fairforget.errors import FairforgetError
from fairforget.evals.crows import scoring_note
from fairforget.evals.interface import Evaluation, Examples, Run
from fairforget.evals.shares import comparison_rows as share_comparison_rows, paired_share_change, share
from fairforget.markdown import ci_text, image, table
from fairforget.plots import interval_bars
from fairforget.stats import proportional_sample
from fairforget.winogender import load_winobias_pairs

PairSet = Literal["minimal", "all"]
TYPES = ("type1", "type2")
GROUPS = ("overall", *TYPES)
OCCUPATION_FILES = ("male_occupations.txt", "female_occupations.txt")
PRONOUNS = frozenset({"he", "she", "him", "her", "his", "hers", "himself", "herself"})


@dataclass(frozen=True)
class WinoBiasPair:
    id: str
    type: str  # type1 | type2
    pro: str
    anti: str
    referent: str  # the occupation the pronoun refers to
    pro_gender: str  # the pronoun's gender in the pro-stereotyped sentence
    cluster: str  # the two occupations of the line, sorted, e.g. "accountant+janitor"
    minimal: bool  # the two sentences differ only in pronouns


def data_files(folder: Path | str) -> list[Path]:
    """The shipped test files (pro and anti, type 1 and 2) and the occupation lists under ``folder``."""
    folder = Path(folder)
    return [*(folder / f"{side}_stereotyped_{kind}.txt.test" for kind in TYPES for side in ("pro", "anti")),
            *(folder / name for name in OCCUPATION_FILES)]


def load_occupations(folder: Path) -> list[str]:
    """The 40 occupations of ``male_occupations.txt`` and ``female_occupations.txt``, lower case."""
    occupations = []
    for name in OCCUPATION_FILES:
        path = folder / name
        if not path.is_file():
            raise FairforgetError(f"WinoBias occupation list not found: {path} (run scripts/00_fetch_data.py)")
        occupations += [line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return occupations


def _words(sentence: str) -> list[str]:
    return [word.strip(".,;:!?'\"") for word in sentence.lower().split()]


def is_minimal(pro: str, anti: str) -> bool:
    """The same words, but where they differ both are pronouns (punctuation and case aside)."""
    a, b = _words(pro), _words(anti)
    return len(a) == len(b) and all(x in PRONOUNS and y in PRONOUNS for x, y in zip(a, b) if x != y)


def load_winobias(folder: Path | str) -> list[WinoBiasPair]:
    """Every pair of the test files under ``folder``; a line that does not name two listed occupations raises
    an error naming the file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FairforgetError(f"WinoBias folder not found: {folder} (run scripts/00_fetch_data.py)")
    occupations = load_occupations(folder)
    patterns = [(o, re.compile(rf"\b{re.escape(o)}s?\b")) for o in occupations]
    pairs = []
    for pair in load_winobias_pairs(folder, "test"):
        kind, _, line = pair.template.split(".")
        found = sorted(o for o, pattern in patterns if pattern.search(pair.advantaged.lower()))
        if len(found) != 2:
            raise FairforgetError(f"{folder / f'pro_stereotyped_{kind}.txt.test'}:{line}: names "
                                  f"{len(found)} of the listed occupations ({', '.join(found) or 'none'}), expected 2")
        pairs.append(WinoBiasPair(pair.pair_id, kind, pair.advantaged, pair.disadvantaged, pair.occupation,
                                  pair.adv_gender, "+".join(found), is_minimal(pair.advantaged, pair.disadvantaged)))
    return pairs


def select_pairs(pairs: Sequence[WinoBiasPair], which: PairSet = "minimal", limit: int | None = None,
                 seed: int = 0) -> list[WinoBiasPair]:
    """The minimal (or all) pairs, then a seeded sample of about ``limit``, proportional per type."""
    if which not in ("minimal", "all"):
        raise FairforgetError(f"--pairs must be minimal or all, got {which!r}")
    kept = [p for p in pairs if p.minimal or which == "all"]
    return proportional_sample([[p for p in kept if p.type == kind] for kind in TYPES], limit, seed)


def score_pairs(model: Any, tokenizer: Any, pairs: Sequence[WinoBiasPair], batch_size: int = 32) -> list[dict]:
    """One item per pair: both sentences' summed log-probabilities and whether the pro-stereotyped one wins (the
    words before the pronoun, which the two share, computed once: ``score_sentence_groups``)."""
    scores = score_sentence_groups(model, tokenizer, [(p.pro, p.anti) for p in pairs], batch_size=batch_size,
                                   desc="WinoBias", names=[(f"WinoBias pair {p.id} (pro)", f"WinoBias pair {p.id} (anti)")
                                                          for p in pairs])
    items = []
    for pair, (pro, anti) in zip(pairs, scores):
        items.append({"id": pair.id, "type": pair.type, "cluster": pair.cluster, "referent": pair.referent,
                      "pro_gender": pair.pro_gender, "pro": pair.pro, "anti": pair.anti,
                      "logprob_pro": pro.logprob, "logprob_anti": anti.logprob, "n_tokens_pro": pro.n_tokens,
                      "n_tokens_anti": anti.n_tokens, "score": "sum", "pro_preferred": bool(pro.logprob > anti.logprob)})
    return items


def _arrays(items: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.array([it["pro_preferred"] for it in items], dtype=bool), np.array([it["type"] for it in items]),
            np.array([it["cluster"] for it in items]))


def _masks(types: np.ndarray) -> dict[str, np.ndarray]:
    """The reported groups present in the items: ``overall`` and each type."""
    masks = {"overall": np.ones(len(types), bool), **{kind: types == kind for kind in TYPES}}
    return {name: mask for name, mask in masks.items() if mask.any()}


def compute_metrics(items: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``metrics[group]`` for ``overall`` and each type: n, n_clusters, metric and its cluster-bootstrap 95% CI."""
    if not items:
        raise FairforgetError("no WinoBias items to summarise")
    flags, types, clusters = _arrays(items)
    return {name: {**share(flags[mask], n_boot, seed, clusters[mask]), "n_clusters": len(set(clusters[mask]))}
            for name, mask in _masks(types).items()}


def compare_runs(items_before: Sequence[dict], items_after: Sequence[dict], n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Paired comparison on the pairs both runs scored, overall and per type: McNemar on the decisions, a paired
    cluster-bootstrap interval of the change and the (cluster-robust) minimum detectable change ``mdc``."""
    after = {it["id"]: it for it in items_after}
    common = [it for it in items_before if it["id"] in after]
    if not common:
        raise FairforgetError("the two WinoBias runs share no pairs; compare runs on the same pairs")
    b, types, clusters = _arrays(common)
    a = _arrays([after[it["id"]] for it in common])[0]
    result: dict[str, Any] = {"n_common": len(common)}
    for name, mask in _masks(types).items():
        result[name] = paired_share_change(b[mask], a[mask], n_boot, seed, clusters[mask])
    return result


def evaluate_winobias(model: Any, tokenizer: Any, pairs: Sequence[WinoBiasPair], batch_size: int = 32,
                      n_boot: int = 1000, seed: int = 0) -> tuple[dict, list[dict]]:
    """Score ``pairs`` and return (metrics, per-pair items)."""
    items = score_pairs(model, tokenizer, pairs, batch_size)
    return compute_metrics(items, n_boot, seed), items


class WinoBiasEvaluation(Evaluation):
    """WinoBias pair likelihood through the shared interface (:mod:`fairforget.evals.interface`)."""

    name, title, script = "winobias", "WinoBias", "17_evaluate_winobias.py"
    item_fields = ("id", "type", "cluster", "pro_preferred")
    comparison_note = ("share of pairs whose pro-stereotyped sentence is preferred; cluster bootstrap over "
                       "occupation pairs; McNemar exact test")
    report_heading, report_overall_only = "WinoBias (pair likelihood, test files)", False

    def load(self, path: Path | str, pairs: PairSet = "minimal", limit: int | None = None, seed: int = 0) -> Examples:
        """The minimal (or all) pairs of the test files in the folder ``path``, sampled to about ``limit``."""
        every = load_winobias(path)
        notes = {"excluded_not_minimal": [p.id for p in every if not p.minimal]} if pairs == "minimal" else {}
        return Examples(select_pairs(every, pairs, limit, seed), data_files(path), notes)

    def evaluate(self, model: Any, tokenizer: Any, examples: Sequence[WinoBiasPair],
                 **options: Any) -> tuple[dict, list]:
        return evaluate_winobias(model, tokenizer, examples, **options)

    def compare(self, before: Sequence[dict], after: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
        return compare_runs(before, after, n_boot, seed)

    def group_sizes(self, metrics: dict) -> dict[str, int]:
        return {group: metrics[group]["n"] for group in GROUPS if group in metrics}

    def write_files(self, folder: Path, metrics: dict, label: str) -> None:
        groups = [g for g in GROUPS if g in metrics]
        write_csv(folder / "metrics.csv", [{"group": g, "n": metrics[g]["n"], "n_clusters": metrics[g]["n_clusters"],
                                            "metric": round(metrics[g]["metric"], 3),
                                            "ci_low": round(metrics[g]["metric_ci"][0], 3),
                                            "ci_high": round(metrics[g]["metric_ci"][1], 3)} for g in groups])
        interval_bars(folder / "winobias_by_type.png", groups,
                      {label: ([metrics[g]["metric"] for g in groups], [metrics[g]["metric_ci"] for g in groups])},
                      "WinoBias: pro-stereotyped sentence preferred (%)", "% of pairs", reference=50)

    def provenance_notes(self, tokenizer: Any, metrics: dict, options: dict) -> dict:
        return {"scoring": scoring_note("sum"),
                "clusters": "occupation pairs (the two occupations of a line, in both types)"}

    def headline(self, metrics: dict) -> str:
        return "WinoBias: " + "  ".join(f"{g} {ci_text(metrics[g]['metric'], metrics[g]['metric_ci'])} "
                                        f"(n={metrics[g]['n']})" for g in GROUPS if g in metrics)

    def comparison_rows(self, comparison: dict, overall_only: bool = False) -> tuple[list[str], list[list]]:
        return share_comparison_rows(((name, c) for name in GROUPS
                                      if (c := comparison.get(name)) and (name == "overall" or not overall_only)), "pro-preferred")

    def report_levels(self, runs: Sequence[Run], folder: Path) -> str:
        first = runs[0].metrics
        groups = [g for g in GROUPS if g in first]
        text = (f"### {self.report_heading}\n\nShare of pairs (%) where the pro-stereotyped sentence has the higher "
                "log-likelihood (ideal 50), with 95% cluster-bootstrap intervals over occupation pairs.\n\n")
        return text + table(["group", *(run.label for run in runs)],
                            [[f"{g} (n={first[g]['n']})",
                              *(ci_text(run.metrics[g]["metric"], run.metrics[g]["metric_ci"], 1)
                                if g in run.metrics else "n/a" for run in runs)] for g in groups])

    def report_plots(self, runs: Sequence[Run], folder: Path) -> str:
        return image(runs[-1].folder / "winobias_by_type.png", f"WinoBias by type, {runs[-1].label}", folder)


WINOBIAS = WinoBiasEvaluation()
