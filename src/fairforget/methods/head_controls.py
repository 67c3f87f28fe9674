"""The controls that attribute a head-pruning effect to the heads: one flat row per model variant of its scores
on the held-out suite (:mod:`fairforget.evals.suite`: BBQ items from scenarios not used for mitigation, the
StereoSet held-out half, CrowS-Pairs, neutral perplexity texts), paired changes against "before", chosen minus
random heads, the controls table and the dose-response plot. Every variant is scored on exactly the same items,
so every comparison is paired.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fairforget import plots
from fairforget.evals import stereoset
from fairforget.evals.bbq_metrics import BbqArrays, metric_function
from fairforget.errors import FairforgetError
from fairforget.evals.suite import Items, SuiteConfig, compare, in_sample, of_gender
from fairforget.stats import bootstrap_ci

EVALS = ("bbq", "stereoset", "crows", "perplexity")


def summary_row(scores: dict, items: Items, n_boot: int, seed: int) -> dict:
    """Every bias figure with its interval beside LMS and perplexity (``scores``: the suite's
    :func:`~fairforget.evals.suite.score_items`): one flat row."""
    m = scores["bbq"][0]["overall"]
    row = {name: m[name] for name in ("acc", "acc_disambig", "s_dis", "s_amb")}
    row.update({f"{name}_ci": m[f"{name}_ci"] for name in ("acc_disambig", "s_dis", "s_amb")})
    if "stereoset" in scores:
        d = stereoset.decisions(scores["stereoset"][1])
        masks = {"gender": d.bias_type == "gender", "overall": np.isin(d.example_ids, sorted(items.stereoset_sample))}
        for name, mask in masks.items():
            s = stereoset.subset_metrics(d, mask, n_boot, seed)
            row.update({f"ss_{name}": s["ss"], f"ss_{name}_ci": s["ss_ci"], f"lms_{name}": s["lms"],
                        f"lms_{name}_ci": s["lms_ci"], f"n_stereoset_{name}": s["n"]})
    if "crows" in scores:
        c = scores["crows"][0]["overall"]
        row.update(crows=c["metric"], crows_ci=c["metric_ci"])
    if "perplexity" in scores:
        row.update(ppl=scores["perplexity"][0]["perplexity"], ppl_ci=scores["perplexity"][0]["perplexity_ci"])
    return row


def paired_row(before: dict, after: dict, items: Items, cfg: SuiteConfig) -> dict:
    """Paired changes (after - before, same items) with intervals and McNemar p-values."""
    items_of = lambda name: (before[name][1], after[name][1])  # noqa: E731
    c = compare("bbq", *items_of("bbq"), cfg)["overall"]
    row = {}
    for name in ("acc_disambig", "s_dis", "s_amb"):
        row[f"d_{name}"], row[f"d_{name}_ci"] = c[f"{name}_delta"], c[f"{name}_delta_ci"]
    row["p_correct"], row["p_biased"] = c["mcnemar_correct"]["p_value"], c["mcnemar_biased"]["p_value"]
    if "stereoset" in after:
        for name, keep in (("gender", of_gender), ("overall", lambda scored: in_sample(scored, items))):
            s = compare("stereoset", *items_of("stereoset"), cfg, keep)["overall"]
            row.update({f"d_ss_{name}": s["delta_ss_micro"], f"d_ss_{name}_ci": s["delta_ss_micro_ci"],
                        f"p_ss_{name}": s["p_value"]})
    if "crows" in after:
        s = compare("crows", *items_of("crows"), cfg)["overall"]
        row.update(d_crows=s["delta"], d_crows_ci=s["delta_ci"], p_crows=s["p_value"])
    if "perplexity" in after:
        s = compare("perplexity", *items_of("perplexity"), cfg)["overall"]
        row.update(d_ppl_pct=s["ppl_change_pct"], d_ppl_pct_ci=s["ppl_change_pct_ci"])
    return row


def _share_stat(flags: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda idx: 100.0 * float(flags[idx].mean())


def stereotype_flags(items: Sequence[dict], ids: set[str] | None = None, bias_type: str | None = None) -> np.ndarray:
    """Per StereoSet example (sorted by id): stereotype preferred, on the ids / bias type asked for."""
    d = stereoset.decisions(items)
    keep = np.array([(ids is None or e in ids) and (bias_type is None or b == bias_type)
                     for e, b in zip(d.example_ids, d.bias_type)], dtype=bool)
    return d.pro[keep]


def difference_from_random(chosen: Callable[[np.ndarray], float], randoms: Sequence[Callable[[np.ndarray], float]],
                           n_items: int, n_boot: int = 1000, seed: int = 0, strata: Any = None,
                           clusters: Any = None) -> dict:
    """chosen - mean(random draws) of a statistic, with a percentile interval from replicates that resample
    the items (within strata, whole clusters) and the random draws together; two-sided bootstrap p of 0."""
    if not randoms:
        raise FairforgetError("comparing with random heads needs at least one random draw")
    rng = np.random.default_rng(seed + 1)
    replicates: list[float] = []

    def statistic(idx: np.ndarray) -> float:
        draws = rng.integers(0, len(randoms), len(randoms))
        value = chosen(idx) - float(np.mean([randoms[d](idx) for d in draws]))
        replicates.append(value)
        return value

    low, high = bootstrap_ci(statistic, n_items, n_boot=n_boot, seed=seed, strata=strata, clusters=clusters)
    every = np.arange(n_items)
    rep = np.array([r for r in replicates if np.isfinite(r)])
    tail = min(int((rep <= 0).sum()), int((rep >= 0).sum())) if rep.size else 0
    return {"delta": chosen(every) - float(np.mean([r(every) for r in randoms])), "ci": [low, high],
            "p": min(1.0, 2 * (tail + 1) / (rep.size + 1)), "n_draws": len(randoms)}


def versus_random(chosen: dict, randoms: Sequence[dict], items: Items, n_boot: int, seed: int) -> dict:
    """Chosen heads minus random heads on every evaluation both have (the suite's scores of each)."""
    out = {}
    bbq = chosen["bbq"][1]
    a = BbqArrays(bbq)
    for name in ("s_amb", "acc_disambig", "s_dis"):
        out[f"bbq_{name}"] = difference_from_random(metric_function(bbq, name),
                                                    [metric_function(r["bbq"][1], name) for r in randoms],
                                                    len(bbq), n_boot, seed, a.categories, a.clusters)
    if "stereoset" in chosen:
        for key, ids, bias in (("ss_gender", None, "gender"), ("ss_overall", items.stereoset_sample, None)):
            flags = stereotype_flags(chosen["stereoset"][1], ids, bias)
            out[key] = difference_from_random(_share_stat(flags), [
                _share_stat(stereotype_flags(r["stereoset"][1], ids, bias)) for r in randoms], len(flags), n_boot, seed)
    if "crows" in chosen:
        flags = np.array([it["stereo_preferred"] for it in chosen["crows"][1]])
        out["crows"] = difference_from_random(_share_stat(flags), [
            _share_stat(np.array([it["stereo_preferred"] for it in r["crows"][1]])) for r in randoms], len(flags),
            n_boot, seed)
    return out


# ---- the controls table and the dose-response figure ------------------------------------------------------

COLUMNS = (("acc_disambig", "BBQ acc (disamb.)", 3), ("s_dis", "s_DIS", 3), ("s_amb", "s_AMB", 3),
           ("ss_gender", "SS gender", 1), ("lms_gender", "LMS gender", 1), ("ss_overall", "SS overall", 1),
           ("lms_overall", "LMS overall", 1), ("crows", "CrowS", 1), ("ppl", "PPL", 2))
CHANGES = (("d_acc_disambig", "acc (disamb.)", 3, "p_correct"), ("d_s_amb", "s_AMB", 3, "p_biased"),
           ("d_ss_gender", "SS gender (micro)", 1, "p_ss_gender"), ("d_ss_overall", "SS overall (micro)", 1,
                                                                    "p_ss_overall"),
           ("d_crows", "CrowS", 1, "p_crows"), ("d_ppl_pct", "PPL %", 1, None))


def _cell(row: dict, key: str, digits: int) -> str:
    if key not in row or row[key] is None:
        return ""
    low, high = row.get(f"{key}_ci", (np.nan, np.nan))
    return f"{row[key]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _spread(rows: Sequence[dict], key: str, digits: int) -> str:
    values = np.array([r[key] for r in rows if key in r and r[key] is not None], dtype=float)
    if not values.size:
        return ""
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if values.size > 1 else 0:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def controls_markdown(rows: dict[str, Any], changes: dict[str, Any], heads: dict[str, str],
                      vs_random: dict[str, dict]) -> str:
    """Three tables: every variant's figures (95% intervals; random: mean ± sd over draws), the paired
    changes against before (interval, McNemar p), and chosen minus random heads."""
    present = [c for c in COLUMNS if any(c[0] in (r[0] if isinstance(r, list) else r) for r in rows.values())]
    body = []
    for name, row in rows.items():
        cells = [_spread(row, key, d) for key, _, d in present] if isinstance(row, list) else \
            [_cell(row, key, d) for key, _, d in present]
        body.append([f"{name} ({len(row)} draws)" if isinstance(row, list) else name, heads.get(name, ""), *cells])
    text = _table(["model", "heads pruned", *[label for _, label, _ in present]], body)
    kept = [c for c in CHANGES if any(c[0] in (r[0] if isinstance(r, list) else r) for r in changes.values())]
    body = []
    for name, row in changes.items():
        if isinstance(row, list):
            body.append([f"{name} ({len(row)} draws)", *[_spread(row, key, d) for key, _, d, _ in kept]])
        else:
            body.append([name, *[_cell(row, key, d) + (f" p={row[p]:.3g}" if p and p in row else "")
                                 for key, _, d, p in kept]])
    text += "\nPaired change against before (same held-out items; 95% paired bootstrap, BBQ over scenario " \
            "clusters; McNemar exact p):\n\n" + _table(["model", *[label for _, label, _, _ in kept]], body)
    body = [[key, f"{v['delta']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]", f"{v['p']:.3g}", v["n_draws"]]
            for key, v in vs_random.items()]
    text += "\nChosen minus random heads (interval resamples items and random draws; two-sided bootstrap p):\n\n" \
            + _table(["metric", "chosen - random [95% CI]", "p", "draws"], body)
    return text


def plot_dose_response(path: Path | str, dose: Sequence[dict], title: str) -> None:
    """s_AMB and disambiguated accuracy against the number of heads pruned: chosen (95% interval) vs random
    draws (each draw a dot, their mean a line)."""
    fig, axes = plots.new_figure(1, 2, figsize=(10, 4))
    ks = [d["k"] for d in dose]
    for ax, (key, label) in zip(axes, (("s_amb", "s_AMB"), ("acc_disambig", "accuracy, disambiguated"))):
        values = [d["chosen"][key] for d in dose]
        low = [v - d["chosen"][f"{key}_ci"][0] for v, d in zip(values, dose)]
        high = [d["chosen"][f"{key}_ci"][1] - v for v, d in zip(values, dose)]
        ax.errorbar(ks, values, yerr=[low, high], marker="o", capsize=3, label="chosen heads")
        for d in dose:
            ax.scatter([d["k"]] * len(d["random"]), [r[key] for r in d["random"]], color="grey", s=12, alpha=0.6)
        ax.plot(ks, [np.mean([r[key] for r in d["random"]]) if d["random"] else d["chosen"][key] for d in dose],
                color="grey", linestyle="--", label="random heads (mean; dots: draws)")
        if key == "s_amb":
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("heads pruned (k)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    plots.save_figure(fig, path)


def compare_choices(first: Path | str, second: Path | str) -> dict[str, Any]:
    """Whether two stage-22 runs (their output folders: ``metrics.json``, ``head_signal.csv``) chose the same
    heads: each run's heads, the heads both chose, their Jaccard overlap, and the Spearman rank correlation of
    the two per-head signals over every head (the planted model's control: does planting move the signal?)."""
    from scipy.stats import spearmanr

    runs = [Path(first), Path(second)]
    for folder in runs:
        for name in ("metrics.json", "head_signal.csv"):
            if not (folder / name).is_file():
                raise FairforgetError(f"{folder / name} is missing: run stage 22 into {folder} first")
    chosen = [{(h["layer"], h["head"]) for h in json.loads((f / "metrics.json").read_text())["heads"]} for f in runs]
    signals = []
    for folder in runs:
        with open(folder / "head_signal.csv", newline="") as f:
            signals.append({(int(r["layer"]), int(r["head"])): float(r["score"]) for r in csv.DictReader(f)})
    if signals[0].keys() != signals[1].keys():
        raise FairforgetError(f"{runs[0]} and {runs[1]} score different heads: not the same model architecture")
    order = sorted(signals[0])
    both, either = chosen[0] & chosen[1], chosen[0] | chosen[1]
    return {"heads": [sorted(c) for c in chosen], "common": sorted(both),
            "jaccard": len(both) / len(either) if either else float("nan"),
            "signal_spearman": float(spearmanr([signals[0][h] for h in order], [signals[1][h] for h in order]).statistic),
            "n_heads": len(order)}
