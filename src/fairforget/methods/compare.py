"""Methods side by side (stage 30): every model scored on the same held-out items through the evaluation
interface, each paired against the same "before" model, and the summary tables.

Each model's items and levels are cached in ``<out>/scores/<name>/`` (``eval.json`` with the settings they
were scored with, ``<evaluation>_items.jsonl``), so an interrupted comparison resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairforget.artifacts import read_json, read_jsonl, write_json, write_jsonl
from fairforget.errors import FairforgetError
from fairforget.evals.bbq import load_bbq, sample_per_category
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.evals.perplexity import load_neutral_texts, perplexity, perplexity_change
from fairforget.evals.registry import EVALUATIONS
from fairforget.evals.stereoset import compute_metrics, decisions, stratified_limit
from fairforget.markdown import ci_text, table
from fairforget.methods.registry import load_output, output_kind
from fairforget.plots import new_figure, save_figure
from fairforget.stats import bootstrap_ci, mcnemar

SUITE = ("stereoset", "crows", "bbq")  # the evaluations every model is scored on, beside perplexity
SETTINGS = ("stereoset_limit", "gender_limit", "crows_limit", "bbq_per_category", "ppl_limit", "half_seed",
            "split_seed", "mitigation_fraction", "n_boot", "seed")


@dataclass
class Items:
    """The held-out items every model is scored on."""

    stereoset: list  # the proportional sample plus every held-out gender example
    stereoset_sample: set[str]  # ids of the proportional sample (overall SS, LMS)
    crows: list
    bbq: list
    neutral: list[str]
    bbq_files: list[Path]


def held_out_items(cfg: Any) -> Items:
    """StereoSet's held-out half (a proportional sample plus the gender examples), CrowS-Pairs, the BBQ scenarios
    stage 22 holds out (same --split-seed), neutral held-out texts; ``cfg`` is stage 30's Config."""
    heldout = EVALUATIONS["stereoset"].load(cfg.stereoset, "heldout", cfg.half_seed).examples
    sample = stratified_limit(heldout, cfg.stereoset_limit, cfg.seed)
    ids = {e.id for e in sample}
    gender = stratified_limit([e for e in heldout if e.bias_type == "gender"], cfg.gender_limit, cfg.seed)
    stereo = sample + [e for e in gender if e.id not in ids]
    crows = EVALUATIONS["crows"].load(cfg.crows, cfg.crows_limit, cfg.seed).examples
    data = load_bbq(cfg.bbq_dir)
    _, held = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)
    bbq = sample_per_category(held, cfg.bbq_per_category, cfg.split_seed)
    return Items(stereo, ids, crows, bbq, load_neutral_texts("heldout", cfg.ppl_limit), list(data.files))


def evaluate_model(name: str, spec: str, items: Items, cfg: Any) -> dict:
    """Score one model on every benchmark; reuse ``<out>/scores/<name>/`` when scored with the same settings."""
    folder = cfg.out / "scores" / name
    settings = {"model": spec, **{k: getattr(cfg, k) for k in SETTINGS}}
    done = folder / "eval.json"
    if done.is_file() and read_json(done).get("settings") == settings:
        print(f"{name}: reusing the scores in {folder}", flush=True)
        result = read_json(done)
    else:
        start = time.perf_counter()
        loaded = load_output(spec, cfg.device)
        batch = cfg.wrapper_batch_size if output_kind(spec) == "wrapper" else cfg.batch_size
        print(f"{name}: scoring {loaded.source}", flush=True)
        options = {"stereoset": {"batch_size": batch}, "crows": {"batch_size": batch},
                   "bbq": {"mode": "answer", "batch_size": max(1, batch // 2)}}
        metrics, scored = {}, {}
        for evaluation in SUITE:
            metrics[evaluation], scored[evaluation] = EVALUATIONS[evaluation].evaluate(
                loaded.model, loaded.tokenizer, getattr(items, evaluation), n_boot=cfg.n_boot, seed=cfg.seed,
                **options[evaluation])
            write_jsonl(folder / f"{evaluation}_items.jsonl", scored[evaluation])
        ppl = perplexity(loaded.model, loaded.tokenizer, items.neutral, max(1, batch // 4), cfg.n_boot, cfg.seed)
        result = {"settings": settings, "source": loaded.source, "eval_seconds": round(time.perf_counter() - start, 1),
                  "stereoset": stereoset_levels(scored["stereoset"], items, cfg),
                  "crows": metrics["crows"],
                  "bbq": {k: metrics["bbq"][k] for k in ("overall", "mode", "answer_norm", "n_items")},
                  "perplexity": ppl}
        write_json(done, result)
        print(f"{name}: scored in {result['eval_seconds']:.0f} s", flush=True)
    for evaluation in SUITE:
        result[f"{evaluation}_items"] = read_jsonl(folder / f"{evaluation}_items.jsonl")
    return result


def in_sample(stereo_items: list[dict], items: Items) -> list[dict]:
    return [it for it in stereo_items if it["example_id"] in items.stereoset_sample]


def stereoset_levels(stereo_items: list[dict], items: Items, cfg: Any) -> dict:
    """Overall SS / LMS on the proportional sample, gender SS on the held-out gender examples scored."""
    overall = compute_metrics(in_sample(stereo_items, items), cfg.n_boot, cfg.seed)["overall"]["all"]
    gender = compute_metrics([it for it in stereo_items if it["bias_type"] == "gender"], cfg.n_boot,
                             cfg.seed)["overall"]["gender"]
    return {"all": overall, "gender": gender}


def distance_change(before_items: list[dict], after_items: list[dict], domain: str | None, n_boot: int,
                    seed: int) -> dict:
    """Paired change of |SS_micro - 50| (points) on the examples of ``domain`` (None: all), with a paired
    bootstrap interval and McNemar on the stereotype-preferred decisions."""
    keep = (lambda it: it["bias_type"] == domain) if domain else (lambda it: True)
    b, a = decisions([i for i in before_items if keep(i)]), decisions([i for i in after_items if keep(i)])
    if b.example_ids != a.example_ids:
        raise FairforgetError("StereoSet runs to compare scored different examples")

    def change(idx: np.ndarray) -> float:
        return abs(100 * a.pro[idx].mean() - 50) - abs(100 * b.pro[idx].mean() - 50)

    every = np.arange(len(b.pro))
    return {"before": abs(100 * b.pro.mean() - 50), "after": abs(100 * a.pro.mean() - 50), "delta": change(every),
            "delta_ci": list(bootstrap_ci(change, len(every), n_boot=n_boot, seed=seed)),
            "p_value": mcnemar(b.pro, a.pro).p_value, "n": len(every)}


def paired(before: dict, after: dict, items: Items, cfg: Any) -> dict:
    """Every paired comparison of one method against the before model, through each evaluation's ``compare``."""
    compare = {name: EVALUATIONS[name].compare for name in SUITE}
    stereo = compare["stereoset"](in_sample(before["stereoset_items"], items),
                                  in_sample(after["stereoset_items"], items), cfg.n_boot, cfg.seed)
    crows = compare["crows"](before["crows_items"], after["crows_items"], cfg.n_boot, cfg.seed)
    bbq = compare["bbq"](before["bbq_items"], after["bbq_items"], cfg.n_boot, cfg.seed)["overall"]
    return {"ss_gender_distance": distance_change(before["stereoset_items"], after["stereoset_items"], "gender",
                                                  cfg.n_boot, cfg.seed),
            "ss_overall": stereo["overall"], "crows_all": crows["overall"], "crows_gender": crows.get("gender"),
            "bbq": bbq, "perplexity": perplexity_change(before["perplexity"], after["perplexity"], cfg.n_boot,
                                                        cfg.seed)}


def _with_p(entry: dict, value: str, interval: str, digits: int = 2) -> str:
    return f"{ci_text(entry[value], entry[interval], digits, signed=True)} p={entry['p_value']:.2g}"


def summary_row(name: str, result: dict, change: dict | None, record: dict) -> dict:
    """One row of summary.csv / .md: the model's levels and, for a method, its paired changes."""
    s, c, q, p = result["stereoset"], result["crows"], result["bbq"]["overall"], result["perplexity"]
    row = {"method": name,
           "ss_gender": ci_text(s["gender"]["ss"], s["gender"]["ss_ci"]),
           "ss_overall": ci_text(s["all"]["ss"], s["all"]["ss_ci"]), "lms": ci_text(s["all"]["lms"], s["all"]["lms_ci"]),
           "crows_gender": ci_text(c["gender"]["metric"], c["gender"]["metric_ci"]),
           "crows_all": ci_text(c["overall"]["metric"], c["overall"]["metric_ci"]),
           "bbq_s_dis": ci_text(q["s_dis"], q["s_dis_ci"], 3), "bbq_s_amb": ci_text(q["s_amb"], q["s_amb_ci"], 3),
           "bbq_acc": ci_text(q["acc"], q["acc_ci"], 3), "perplexity": ci_text(p["perplexity"], p["perplexity_ci"]),
           "wall_seconds": record.get("wall_seconds", "n/a"), "peak_memory_mib": record.get("peak_memory_mib", "n/a")}
    if change:
        b, pp = change["bbq"], change["perplexity"]
        row.update({
            "d_gender_distance": _with_p(change["ss_gender_distance"], "delta", "delta_ci"),
            "d_ss_overall": _with_p(change["ss_overall"], "delta_ss_micro", "delta_ss_micro_ci"),
            "d_crows_gender": _with_p(change["crows_gender"], "delta", "delta_ci"),
            "d_crows_all": _with_p(change["crows_all"], "delta", "delta_ci"),
            "d_bbq_s_amb": ci_text(b["s_amb_delta"], b["s_amb_delta_ci"], 3, signed=True),
            "d_bbq_acc": f"{ci_text(b['acc_delta'], b['acc_delta_ci'], 3, signed=True)} "
                         f"p={b['mcnemar_correct']['p_value']:.2g}",
            "d_ppl_pct": ci_text(pp["ppl_change_pct"], pp["ppl_change_pct_ci"], 1, signed=True)})
    return row


LEVELS = [("method", "method"), ("ss_gender", "SS gender"), ("ss_overall", "SS overall"), ("lms", "LMS"),
          ("crows_gender", "CrowS gender"), ("crows_all", "CrowS all"), ("bbq_s_dis", "BBQ s_DIS"),
          ("bbq_s_amb", "BBQ s_AMB"), ("bbq_acc", "BBQ acc"), ("perplexity", "perplexity"),
          ("wall_seconds", "method wall s"), ("peak_memory_mib", "peak MiB")]
CHANGES = [("method", "method"), ("d_gender_distance", "Δ gender abs(SS-50)"), ("d_ss_overall", "Δ SS overall"),
           ("d_crows_gender", "Δ CrowS gender"), ("d_crows_all", "Δ CrowS all"), ("d_bbq_s_amb", "Δ BBQ s_AMB"),
           ("d_bbq_acc", "Δ BBQ acc"), ("d_ppl_pct", "Δ perplexity %")]


def markdown(rows: list[dict], items: Items, before: str, seconds: float) -> str:
    """summary.md: what was scored, the levels table and the paired-change table."""
    def columns(spec: list[tuple[str, str]], subset: list[dict]) -> str:
        return table([title for _, title in spec], [[r.get(k, "") for k, _ in spec] for r in subset])

    n_gender = sum(e.bias_type == "gender" for e in items.stereoset)
    head = (f"# Debiasing methods side by side (before: `{before}`)\n\n"
            f"Held-out items: StereoSet dev held-out half, {len(items.stereoset_sample)} examples (proportional sample: "
            f"overall SS, LMS) plus held-out gender examples ({len(items.stereoset) - len(items.stereoset_sample)} "
            f"more; gender SS on all {n_gender}), {len(items.crows)} CrowS-Pairs pairs, {len(items.bbq)} BBQ examples "
            f"(answer mode, held-out scenarios), {len(items.neutral)} neutral texts. 95% bootstrap intervals in "
            f"brackets. Comparison wall time {seconds:.0f} s.\n\n## Levels\n\n")
    return (head + columns(LEVELS, rows) + "\n## Paired change against before (same items; p: McNemar exact)\n\n"
            + columns(CHANGES, [r for r in rows if r["method"] != "before"]))


def paired_rows(changes: dict[str, dict]) -> list[dict]:
    """paired.csv: one row per method and measure, scalar fields then intervals."""
    return [{"method": n, "measure": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, (dict, list))},
             **{kk: vv for kk, vv in v.items() if isinstance(vv, list)}}
            for n, c in changes.items() for k, v in c.items() if v]


def plot(changes: dict[str, dict], path: Path) -> None:
    """Change in gender |SS - 50| against the perplexity change, each with its paired 95% interval."""
    fig, ax = new_figure(figsize=(6.5, 4.5))
    for name, c in changes.items():
        d, p = c["ss_gender_distance"], c["perplexity"]
        x, y = p["ppl_change_pct"], d["delta"]
        ax.errorbar([x], [y], xerr=[[x - p["ppl_change_pct_ci"][0]], [p["ppl_change_pct_ci"][1] - x]],
                    yerr=[[y - d["delta_ci"][0]], [d["delta_ci"][1] - y]], fmt="o", capsize=3, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("perplexity change on neutral held-out text (%, 95% CI)")
    ax.set_ylabel("change in StereoSet gender |SS - 50| (points, 95% CI)")
    ax.set_title("Bias change vs capability change (paired, held-out)")
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)
