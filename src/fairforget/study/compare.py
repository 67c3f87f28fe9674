"""Methods side by side (stage 30): the tables and the figure of every method scored by the held-out suite
(:mod:`fairforget.evals.suite`), each paired against the same "before" model; with a start reference (the
unplanted model of a positive control), the share of the planted shift each method removes."""

from __future__ import annotations

from pathlib import Path

from fairforget.evals.bbq import BBQ_GENDER
from fairforget.evals.suite import Items, in_sample
from fairforget.markdown import ci_text, table
from fairforget.methods import plant
from fairforget.plots import new_figure, save_figure


def _with_p(entry: dict, value: str, interval: str, digits: int = 2) -> str:
    """A paired change with its interval, McNemar p and the minimum detectable change of its items."""
    return (f"{ci_text(entry[value], entry[interval], digits, signed=True)} p={entry['p_value']:.2g} "
            f"mdc={entry['mdc']:.{digits}f}")


def summary_row(name: str, result: dict, change: dict | None, record: dict) -> dict:
    """One row of summary.csv / .md: the model's levels and, for a method, its paired changes."""
    s, c, q, p = result["stereoset"], result["crows"], result["bbq"]["overall"], result["perplexity"]
    row = {"method": name,
           "ss_gender": ci_text(s["gender"]["ss"], s["gender"]["ss_ci"]),
           "ss_overall": ci_text(s["all"]["ss"], s["all"]["ss_ci"]), "lms": ci_text(s["all"]["lms"], s["all"]["lms_ci"]),
           "crows_gender": ci_text(c["gender"]["metric"], c["gender"]["metric_ci"]),
           "crows_all": ci_text(c["overall"]["metric"], c["overall"]["metric_ci"]),
           "winobias": ci_text(result["winobias"]["overall"]["metric"], result["winobias"]["overall"]["metric_ci"]),
           "bbq_s_dis": ci_text(q["s_dis"], q["s_dis_ci"], 3), "bbq_s_amb": ci_text(q["s_amb"], q["s_amb_ci"], 3),
           "bbq_acc": ci_text(q["acc"], q["acc_ci"], 3), "perplexity": ci_text(p["perplexity"], p["perplexity_ci"]),
           "wall_seconds": record.get("wall_seconds", "n/a"), "peak_memory_mib": record.get("peak_memory_mib", "n/a")}
    if "gender" in result["bbq"]:
        g = result["bbq"]["gender"]
        row["bbq_gender_s_amb"] = ci_text(g["s_amb"], g["s_amb_ci"], 3)
    if change:
        b, pp = change["bbq"], change["perplexity"]
        row.update({
            "d_gender_distance": _with_p(change["ss_gender_distance"], "delta", "delta_ci"),
            "d_ss_overall": _with_p(change["ss_overall"], "delta_ss_micro", "delta_ss_micro_ci"),
            "d_crows_gender": _with_p(change["crows_gender"], "delta", "delta_ci"),
            "d_crows_all": _with_p(change["crows_all"], "delta", "delta_ci"),
            "d_winobias": _with_p(change["winobias"], "delta", "delta_ci"),
            "d_bbq_s_amb": ci_text(b["s_amb_delta"], b["s_amb_delta_ci"], 3, signed=True),
            "d_bbq_acc": f"{ci_text(b['acc_delta'], b['acc_delta_ci'], 3, signed=True)} "
                         f"p={b['mcnemar_correct']['p_value']:.2g}",
            "d_ppl_pct": ci_text(pp["ppl_change_pct"], pp["ppl_change_pct_ci"], 1, signed=True)})
        if "bbq_gender" in change:
            g = change["bbq_gender"]
            row["d_bbq_gender_s_amb"] = (f"{ci_text(g['delta'], g['delta_ci'], 3, signed=True)} "
                                         f"p={g['p_value']:.2g} mdc={g['mdc']:.3f}")
    return row


LEVELS = [("method", "method"), ("ss_gender", "SS gender"), ("ss_overall", "SS overall"), ("lms", "LMS"),
          ("crows_gender", "CrowS gender"), ("crows_all", "CrowS all"), ("winobias", "WinoBias pro %"),
          ("bbq_s_dis", "BBQ s_DIS"),
          ("bbq_s_amb", "BBQ s_AMB"), ("bbq_acc", "BBQ acc"), ("bbq_gender_s_amb", "BBQ gender s_AMB"),
          ("perplexity", "perplexity"),
          ("wall_seconds", "method wall s"), ("peak_memory_mib", "peak MiB")]
SCORED_IF_ASKED = ("bbq_gender_s_amb", "d_bbq_gender_s_amb")  # columns shown only where stage 30 scored BBQ gender
CHANGES = [("method", "method"), ("d_gender_distance", "Δ gender abs(SS-50)"), ("d_ss_overall", "Δ SS overall"),
           ("d_crows_gender", "Δ CrowS gender"), ("d_crows_all", "Δ CrowS all"), ("d_winobias", "Δ WinoBias pro %"),
           ("d_bbq_s_amb", "Δ BBQ s_AMB"), ("d_bbq_acc", "Δ BBQ acc"), ("d_bbq_gender_s_amb", "Δ BBQ gender s_AMB"),
           ("d_ppl_pct", "Δ perplexity %")]


def markdown(rows: list[dict], items: Items, before: str, seconds: float) -> str:
    """summary.md: what was scored, the levels table and the paired-change table."""
    def columns(spec: list[tuple[str, str]], subset: list[dict]) -> str:
        spec = [(k, title) for k, title in spec if k not in SCORED_IF_ASKED or any(k in r for r in subset)]
        return table([title for _, title in spec], [[r.get(k, "") for k, _ in spec] for r in subset])

    n_gender = sum(e.bias_type == "gender" for e in items.stereoset)
    head = (f"# Debiasing methods side by side (before: `{before}`)\n\n"
            f"Held-out items: StereoSet dev held-out half, {len(items.stereoset_sample)} examples (proportional sample: "
            f"overall SS, LMS) plus held-out gender examples ({len(items.stereoset) - len(items.stereoset_sample)} "
            f"more; gender SS on all {n_gender}), {len(items.crows_sample)} CrowS-Pairs pairs (proportional sample: all) "
            f"plus every gender pair ({sum(p.bias_type == 'gender' for p in items.crows)} in all), {len(items.winobias)} "
            f"WinoBias test pairs, {len(items.bbq_sample)} BBQ examples (answer mode, held-out scenarios; "
            f"{sum(e.category == BBQ_GENDER for e in items.bbq)} Gender_identity examples for BBQ gender), "
            f"{len(items.neutral)} "
            f"neutral texts. 95% bootstrap intervals in brackets. Comparison wall time {seconds:.0f} s.\n\n## Levels\n\n")
    return (head + columns(LEVELS, rows) + "\n## Paired change against before (same items; p: McNemar exact; mdc: the "
            "minimum detectable change of these items, the half-width of the paired 95% interval under no change: a "
            "change smaller than it could not have been seen)\n\n"
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


# ---- training data: transfer (the default pairs) against another pair source --------------------------------------

SOURCE_MARK = "+"  # stage 30's name of a method trained on another pair source: <method>+<source>
SOURCE_MEASURES = [("ss_gender_distance", "Δ gender abs(SS-50) (StereoSet)"), ("crows_gender", "Δ CrowS gender"),
                   ("winobias", "Δ WinoBias pro %"), ("bbq_gender", "Δ BBQ gender s_AMB")]


def pair_source_run(method: str, source: str) -> str:
    """Stage 30's name of ``method`` trained on the pairs of ``source`` (stage 10)."""
    return f"{method}{SOURCE_MARK}{source}"


def pair_source_markdown(changes: dict[str, dict]) -> str:
    """The summary.md section: each method beside its runs on other pair sources, the paired change of every bias
    measure (StereoSet is in-domain for ``stereoset_selection``; CrowS-Pairs and WinoBias say whether a gain
    carries beyond the benchmark trained on)."""
    rows = []
    for name, change in changes.items():
        if SOURCE_MARK not in name or name.split(SOURCE_MARK, 1)[0] not in changes:
            continue
        method, source = name.split(SOURCE_MARK, 1)
        for label, entry in (("default pairs", changes[method]), (source, change)):
            rows.append([method, label, *(_with_p(entry[key], "delta", "delta_ci") if key in entry else ""
                                          for key, _ in SOURCE_MEASURES),
                         ci_text(entry["perplexity"]["ppl_change_pct"], entry["perplexity"]["ppl_change_pct_ci"], 1,
                                 signed=True)])
    if not rows:
        return ""
    return ("\n## Training data: the default pairs against another pair source (paired against before)\n\n"
            "A gain on StereoSet from StereoSet-selection pairs that does not reach CrowS-Pairs or WinoBias is "
            "benchmark fitting, not debiasing.\n\n"
            + table(["method", "pairs", *(t for _, t in SOURCE_MEASURES), "Δ perplexity %"], rows))


# ---- positive controls: the share of a planted shift each method removes (stage 30 --start) ---------------------

SHARE_MEASURES = [("stereoset_gender", "StereoSet gender micro SS"),
                  ("stereoset_overall", "StereoSet overall micro SS (sample)"),
                  ("crows_gender", "CrowS-Pairs gender"), ("winobias", "WinoBias pro %")]


def planted_shares(start: dict, before: dict, methods: dict[str, dict], items: Items, n_boot: int,
                   seed: int) -> dict[str, dict[str, dict]]:
    """Per method and measure of :data:`SHARE_MEASURES`, the share of the planted shift (``before``, the planted
    model, against ``start``) the method removes, paired over the same items (:mod:`fairforget.methods.plant`)."""
    def runs(result: dict) -> dict[str, list[dict]]:
        return {"stereoset_gender": result["stereoset_items"],
                "stereoset_overall": in_sample(result["stereoset_items"], items),
                "crows_gender": result["crows_items"], "winobias": result["winobias_items"]}

    share = {"stereoset_gender": lambda *r, **o: plant.stereoset_share(*r, domain="gender", **o),
             "stereoset_overall": lambda *r, **o: plant.stereoset_share(*r, domain=None, **o),
             "crows_gender": lambda *r, **o: plant.crows_share(*r, bias_type="gender", **o),
             "winobias": plant.winobias_share}
    levels = [runs(start), runs(before)]
    return {name: {key: share[key](levels[0][key], levels[1][key], runs(result)[key], n_boot=n_boot, seed=seed)
                   for key, _ in SHARE_MEASURES}
            for name, result in methods.items()}


def lms_change(name: str, results: dict[str, dict]) -> float:
    """Model ``name``'s LMS (overall sample) minus the before model's."""
    return results[name]["stereoset"]["all"]["lms"] - results["before"]["stereoset"]["all"]["lms"]


def _cost(name: str, results: dict[str, dict], changes: dict[str, dict]) -> dict:
    """A method's capability cost against the planted model: the LMS change (overall sample) and the paired
    perplexity change in %."""
    p = changes[name]["perplexity"]
    return {"d_lms": lms_change(name, results), "d_ppl_pct": p["ppl_change_pct"],
            "d_ppl_pct_ci": p["ppl_change_pct_ci"]}


def share_rows(shares: dict[str, dict[str, dict]], results: dict[str, dict], changes: dict[str, dict]) -> list[dict]:
    """shares.csv: one row per method and measure, the share with its interval, the three bias levels, the
    planted shift and the method's capability cost."""
    rows = []
    for name, by in shares.items():
        cost = _cost(name, results, changes)
        for key, _ in SHARE_MEASURES:
            s = by[key]
            rows.append({"method": name, "measure": key, "share_removed_pct": s["share_removed_pct"],
                         "ci_low": s["share_removed_pct_ci"][0], "ci_high": s["share_removed_pct_ci"][1],
                         **{k: s[k] for k in ("bias_start", "bias_planted", "bias_method", "planted_shift")},
                         "planted_shift_ci_low": s["planted_shift_ci"][0],
                         "planted_shift_ci_high": s["planted_shift_ci"][1], "n": s["n"],
                         "d_lms": cost["d_lms"], "d_ppl_pct": cost["d_ppl_pct"],
                         "d_ppl_pct_ci_low": cost["d_ppl_pct_ci"][0], "d_ppl_pct_ci_high": cost["d_ppl_pct_ci"][1]})
    return rows


def shares_markdown(shares: dict[str, dict[str, dict]], results: dict[str, dict], changes: dict[str, dict],
                    start: str) -> str:
    """The summary.md section: the planted shift per measure, then method x share removed x capability cost."""
    if not shares:
        return ""
    first = next(iter(shares.values()))
    shift = table(["measure", "n", "start", "planted", "planted shift [95% CI]"],
                  [[title, first[key]["n"], f"{first[key]['bias_start']:.2f}", f"{first[key]['bias_planted']:.2f}",
                    ci_text(first[key]["planted_shift"], first[key]["planted_shift_ci"], signed=True)]
                   for key, title in SHARE_MEASURES])
    rows = []
    for name, by in shares.items():
        cost = _cost(name, results, changes)
        rows.append([name, *(ci_text(by[key]["share_removed_pct"], by[key]["share_removed_pct_ci"], 1)
                             for key, _ in SHARE_MEASURES),
                     f"{cost['d_lms']:+.2f}", ci_text(cost["d_ppl_pct"], cost["d_ppl_pct_ci"], 1, signed=True)])
    return (f"\n## Share of the planted shift removed (start: `{start}`; before: the planted model)\n\n"
            "100 * (planted - method) / (planted - start) on the same items, paired percentile bootstrap 95% interval "
            "(0%: nothing removed, 100%: back to the start model, above 100%: overshoot; n/a: no planted shift on "
            "that measure). A measure whose planted shift interval covers 0 carries no control there.\n\n"
            + shift + "\n"
            + table(["method", *(f"{title} share removed %" for _, title in SHARE_MEASURES), "Δ LMS vs planted",
                     "Δ perplexity % vs planted"], rows))
