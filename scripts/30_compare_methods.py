"""Stage 30: every debiasing method on the same held-out items, each paired against the same "before" model.

    python scripts/30_compare_methods.py [--methods cda=models/methods/cda ...] [--stereoset-limit N]

Per model (the "before" model first, then each ``name=folder`` of --methods, loaded with
``fairforget.methods.load_method``, so Self-Debias is its scoring wrapper):

* StereoSet (held-out half of dev, never the selection half a method chose on): overall SS and LMS on a
  seeded proportional sample of --stereoset-limit examples, gender SS on the gender examples of the
  held-out half (all, or a seeded --gender-limit sample; the proportional sample alone holds too few);
* CrowS-Pairs, gender and all bias types;
* BBQ in answer mode on the held-out scenarios of stage 22's split (``bbq_split.split_by_scenario``, the same
  --split-seed, so head pruning never saw them): s_DIS, s_AMB, accuracy;
* perplexity on the neutral held-out texts (``fairforget.evals.perplexity``).

Each cell has its 95% interval (bootstrap). Paired tests of each method against "before" on the same items:
StereoSet change in gender |SS - 50| and overall SS (paired bootstrap, McNemar on the stereotype-preferred
decisions), CrowS-Pairs (McNemar, paired bootstrap), BBQ (paired bootstrap of each metric, McNemar on
correctness), perplexity (paired bootstrap of the relative change). Wall time and peak memory of each method
come from its ``method.json`` (--records). Each model's scores are kept in ``<out>/scores/<name>/`` and reused when the
settings match, so an interrupted comparison resumes. Writes ``summary.csv``, ``summary.md``,
``paired.csv``, ``bias_vs_capability.png`` and ``metrics.json`` (with provenance) to --out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fairforget.artifacts import provenance, read_json, read_jsonl, write_csv, write_json, write_jsonl, write_text
from fairforget.evals.bbq import load_bbq, sample_per_category
from fairforget.evals.bbq_eval import evaluate_bbq
from fairforget.evals.bbq_metrics import compare_runs as compare_bbq
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.config import run_script
from fairforget.evals.crows import compare_runs as compare_crows
from fairforget.evals.crows import compute_metrics as crows_metrics
from fairforget.evals.crows import load_crows, sample_pairs, score_pairs
from fairforget.errors import FairforgetError
from fairforget.methods import load_method
from fairforget.models import DEFAULT_EMBEDDED
from fairforget.plots import new_figure, save_figure
from fairforget.evals.perplexity import load_neutral_texts, perplexity, perplexity_change, texts_provenance
from fairforget.stats import bootstrap_ci, mcnemar
from fairforget.evals.stereoset import compare_runs as compare_stereoset
from fairforget.evals.stereoset import compute_metrics as compute_stereoset
from fairforget.evals.stereoset import decisions, load_stereoset, score_examples, select_half, stratified_limit

METHODS = ("cda", "task_vector", "self_debias", "bias_unlearn", "pcgu", "head_pruning")


@dataclass
class Config:
    before: str = field(default=DEFAULT_EMBEDDED, metadata={"help": "the model every method starts from"})
    methods: list[str] = field(default_factory=lambda: [
        "cda=models/methods/cda", "task_vector=models/methods/task_vector", "self_debias=models/methods/self_debias",
        "bias_unlearn=models/methods/bias_unlearn", "pcgu=models/methods/pcgu",
        "head_pruning=models/recovered/smollm2-135m-instruct"], metadata={"help": "name=model folder"})
    records: list[str] = field(default_factory=lambda: [f"{m}=outputs/methods/{m}/method.json" for m in METHODS],
                               metadata={"help": "name=method.json with wall_seconds and peak_memory_mib"})
    stereoset: Path = Path("data/stereoset/dev.json")
    crows: Path = Path("data/crows_pairs/data/crows_pairs_anonymized.csv")
    bbq_dir: Path = Path("data/bbq")
    stereoset_limit: int | None = field(default=300, metadata={"help": "held-out StereoSet sample (None: all)"})
    gender_limit: int | None = field(default=None, metadata={"help": "seeded sample of the held-out gender "
                                                                      "examples for gender SS (None: every one)"})
    crows_limit: int | None = 200
    bbq_per_category: int | None = field(default=8, metadata={"help": "held-out BBQ examples per category"})
    ppl_limit: int | None = field(default=50, metadata={"help": "neutral held-out texts for perplexity"})
    half_seed: int = 0
    split_seed: int = field(default=0, metadata={"help": "stage 22's scenario split seed (held-out BBQ side)"})
    mitigation_fraction: float = 0.5
    batch_size: int = 32
    self_debias_batch_size: int = field(default=4, metadata={"help": "Self-Debias keeps [batch, length, vocab] "
                                                                     "distributions per prefix: smaller batches"})
    n_boot: int = 1000
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: Path = Path("outputs/methods")

    def validate(self) -> None:
        for entry in (*self.methods, *self.records):
            if "=" not in entry:
                raise FairforgetError(f"--methods and --records take name=path, got {entry!r}")
        names = [m.split("=", 1)[0] for m in self.methods]
        if "before" in names or len(set(names)) != len(names):
            raise FairforgetError(f"--methods names must be unique and not 'before': {names}")
        for entry in self.methods:
            name, spec = entry.split("=", 1)
            if not Path(spec).exists():
                raise FairforgetError(f"--methods {name}: {spec} not found (run its stage first)")
        if self.batch_size < 1 or self.self_debias_batch_size < 1 or self.n_boot < 1:
            raise FairforgetError("--batch-size, --self-debias-batch-size and --n-boot must be at least 1")


@dataclass
class Items:
    """The held-out items every model is scored on."""

    stereoset: list  # the proportional sample plus every held-out gender example
    stereoset_sample: set[str]  # ids of the proportional sample (overall SS, LMS)
    crows: list
    bbq: list
    neutral: list[str]
    bbq_files: list[Path]


def held_out_items(cfg: Config) -> Items:
    heldout = select_half(load_stereoset(cfg.stereoset), "heldout", cfg.half_seed)
    sample = stratified_limit(heldout, cfg.stereoset_limit, cfg.seed)
    ids = {e.id for e in sample}
    gender = stratified_limit([e for e in heldout if e.bias_type == "gender"], cfg.gender_limit, cfg.seed)
    stereo = sample + [e for e in gender if e.id not in ids]
    crows = sample_pairs(load_crows(cfg.crows), cfg.crows_limit, cfg.seed)
    data = load_bbq(cfg.bbq_dir)
    _, held = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)
    bbq = sample_per_category(held, cfg.bbq_per_category, cfg.split_seed)
    return Items(stereo, ids, crows, bbq, load_neutral_texts("heldout", cfg.ppl_limit), list(data.files))


def eval_settings(cfg: Config, spec: str) -> dict:
    keys = ("stereoset_limit", "gender_limit", "crows_limit", "bbq_per_category", "ppl_limit", "half_seed", "split_seed",
            "mitigation_fraction", "n_boot", "seed")
    return {"model": spec, **{k: getattr(cfg, k) for k in keys}}


def evaluate_model(name: str, spec: str, items: Items, cfg: Config) -> dict:
    """Score one model on every benchmark; reuse ``<out>/<name>/`` when it was scored with the same settings."""
    folder = cfg.out / "scores" / name
    settings = eval_settings(cfg, spec)
    done = folder / "eval.json"
    if done.is_file() and read_json(done).get("settings") == settings:
        print(f"{name}: reusing the scores in {folder}", flush=True)
        result = read_json(done)
    else:
        start = time.perf_counter()
        loaded = load_method(spec, cfg.device)
        batch = cfg.self_debias_batch_size if loaded.name.startswith("self-debias") else cfg.batch_size
        model, tok = loaded.model, loaded.tokenizer
        print(f"{name}: scoring {loaded.source}", flush=True)
        stereo_items = score_examples(model, tok, items.stereoset, batch)
        crows_items = score_pairs(model, tok, items.crows, batch)
        bbq_metrics, bbq_items = evaluate_bbq(model, tok, items.bbq, "answer", batch_size=max(1, batch // 2),
                                              n_boot=cfg.n_boot, seed=cfg.seed)
        ppl = perplexity(model, tok, items.neutral, max(1, batch // 4), cfg.n_boot, cfg.seed)
        write_jsonl(folder / "stereoset_items.jsonl", stereo_items)
        write_jsonl(folder / "crows_items.jsonl", crows_items)
        write_jsonl(folder / "bbq_items.jsonl", bbq_items)
        result = {"settings": settings, "source": loaded.source, "eval_seconds": round(time.perf_counter() - start, 1),
                  "stereoset": stereoset_metrics(stereo_items, items, cfg), "crows": crows_metrics(crows_items, cfg.n_boot, cfg.seed),
                  "bbq": {k: bbq_metrics[k] for k in ("overall", "mode", "answer_norm", "n_items")},
                  "perplexity": ppl}
        write_json(done, result)
        print(f"{name}: scored in {result['eval_seconds']:.0f} s", flush=True)
    result["stereoset_items"] = read_jsonl(folder / "stereoset_items.jsonl")
    result["crows_items"] = read_jsonl(folder / "crows_items.jsonl")
    result["bbq_items"] = read_jsonl(folder / "bbq_items.jsonl")
    return result


def in_sample(stereo_items: list[dict], items: Items) -> list[dict]:
    return [it for it in stereo_items if it["example_id"] in items.stereoset_sample]


def stereoset_metrics(stereo_items: list[dict], items: Items, cfg: Config) -> dict:
    """Overall SS / LMS on the proportional sample, gender SS on the held-out gender examples scored."""
    overall = compute_stereoset(in_sample(stereo_items, items), cfg.n_boot, cfg.seed)["overall"]["all"]
    gender = compute_stereoset([it for it in stereo_items if it["bias_type"] == "gender"], cfg.n_boot,
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


def paired(before: dict, after: dict, items: Items, cfg: Config) -> dict:
    """Every paired comparison of one method against the before model."""
    stereo = compare_stereoset(in_sample(before["stereoset_items"], items), in_sample(after["stereoset_items"], items),
                               cfg.n_boot, cfg.seed)
    crows = compare_crows(before["crows_items"], after["crows_items"], cfg.n_boot, cfg.seed)
    bbq = compare_bbq(before["bbq_items"], after["bbq_items"], cfg.n_boot, cfg.seed)["overall"]
    return {"ss_gender_distance": distance_change(before["stereoset_items"], after["stereoset_items"], "gender",
                                                  cfg.n_boot, cfg.seed),
            "ss_overall": stereo["overall"], "crows_all": crows["overall"], "crows_gender": crows.get("gender"),
            "bbq": bbq, "perplexity": perplexity_change(before["perplexity"], after["perplexity"], cfg.n_boot,
                                                        cfg.seed)}


def _cell(value: float, interval: Any, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    lo, hi = interval
    return f"{fmt.format(value)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def summary_row(name: str, result: dict, change: dict | None, record: dict) -> dict:
    s, c, q, p = result["stereoset"], result["crows"], result["bbq"]["overall"], result["perplexity"]
    row = {"method": name,
           "ss_gender": _cell(s["gender"]["ss"], s["gender"]["ss_ci"]), "ss_overall": _cell(s["all"]["ss"], s["all"]["ss_ci"]),
           "lms": _cell(s["all"]["lms"], s["all"]["lms_ci"]),
           "crows_gender": _cell(c["gender"]["metric"], c["gender"]["metric_ci"]),
           "crows_all": _cell(c["overall"]["metric"], c["overall"]["metric_ci"]),
           "bbq_s_dis": _cell(q["s_dis"], q["s_dis_ci"], 3), "bbq_s_amb": _cell(q["s_amb"], q["s_amb_ci"], 3),
           "bbq_acc": _cell(q["acc"], q["acc_ci"], 3),
           "perplexity": _cell(p["perplexity"], p["perplexity_ci"]),
           "wall_seconds": record.get("wall_seconds", "n/a"), "peak_memory_mib": record.get("peak_memory_mib", "n/a")}
    if change:
        d, o, cg, ca, b, pp = (change[k] for k in ("ss_gender_distance", "ss_overall", "crows_gender", "crows_all",
                                                     "bbq", "perplexity"))
        row.update({
            "d_gender_distance": f"{_cell(d['delta'], d['delta_ci'], sign=True)} p={d['p_value']:.2g}",
            "d_ss_overall": f"{_cell(o['delta_ss_micro'], o['delta_ss_micro_ci'], sign=True)} p={o['p_value']:.2g}",
            "d_crows_gender": f"{_cell(cg['delta'], cg['delta_ci'], sign=True)} p={cg['p_value']:.2g}",
            "d_crows_all": f"{_cell(ca['delta'], ca['delta_ci'], sign=True)} p={ca['p_value']:.2g}",
            "d_bbq_s_amb": _cell(b["s_amb_delta"], b["s_amb_delta_ci"], 3, sign=True),
            "d_bbq_acc": f"{_cell(b['acc_delta'], b['acc_delta_ci'], 3, sign=True)} "
                         f"p={b['mcnemar_correct']['p_value']:.2g}",
            "d_ppl_pct": _cell(pp["ppl_change_pct"], pp["ppl_change_pct_ci"], 1, sign=True)})
    return row


LEVELS = [("method", "method"), ("ss_gender", "SS gender"), ("ss_overall", "SS overall"), ("lms", "LMS"),
          ("crows_gender", "CrowS gender"), ("crows_all", "CrowS all"), ("bbq_s_dis", "BBQ s_DIS"),
          ("bbq_s_amb", "BBQ s_AMB"), ("bbq_acc", "BBQ acc"), ("perplexity", "perplexity"),
          ("wall_seconds", "method wall s"), ("peak_memory_mib", "peak MiB")]
CHANGES = [("method", "method"), ("d_gender_distance", "Δ gender abs(SS-50)"), ("d_ss_overall", "Δ SS overall"),
           ("d_crows_gender", "Δ CrowS gender"), ("d_crows_all", "Δ CrowS all"), ("d_bbq_s_amb", "Δ BBQ s_AMB"),
           ("d_bbq_acc", "Δ BBQ acc"), ("d_ppl_pct", "Δ perplexity %")]


def markdown(rows: list[dict], items: Items, cfg: Config, seconds: float) -> str:
    def table(columns: list[tuple[str, str]], subset: list[dict]) -> list[str]:
        lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
        return lines + ["| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |" for r in subset]

    head = [f"# Debiasing methods side by side (before: `{cfg.before}`)\n",
            f"Held-out items: StereoSet dev held-out half, {len(items.stereoset_sample)} examples (proportional sample: "
            f"overall SS, LMS) plus held-out gender examples ({len(items.stereoset) - len(items.stereoset_sample)} more; "
            f"gender SS on all {sum(e.bias_type == 'gender' for e in items.stereoset)}), {len(items.crows)} "
            f"CrowS-Pairs pairs, {len(items.bbq)} BBQ examples (answer mode, held-out scenarios), "
            f"{len(items.neutral)} neutral texts. 95% bootstrap intervals in brackets. Comparison wall time "
            f"{seconds:.0f} s.\n", "## Levels\n"]
    body = table(LEVELS, rows) + ["", "## Paired change against before (same items; p: McNemar exact)\n"]
    body += table(CHANGES, [r for r in rows if r["method"] != "before"])
    return "\n".join(head + body) + "\n"


def plot(changes: dict[str, dict], path: Path) -> None:
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


def main(cfg: Config) -> None:
    start = time.perf_counter()
    items = held_out_items(cfg)
    specs = {"before": cfg.before, **dict(m.split("=", 1) for m in cfg.methods)}
    record_files = dict(r.split("=", 1) for r in cfg.records)
    print(f"comparing {len(specs) - 1} methods on {len(items.stereoset)} StereoSet, {len(items.crows)} CrowS-Pairs, "
          f"{len(items.bbq)} BBQ items and {len(items.neutral)} neutral texts", flush=True)
    results = {name: evaluate_model(name, spec, items, cfg) for name, spec in specs.items()}
    changes = {name: paired(results["before"], r, items, cfg) for name, r in results.items() if name != "before"}
    records = {name: read_json(record_files[name], f"{name} method record") if Path(record_files.get(name, "")).is_file()
               else {} for name in specs}
    rows = [summary_row(name, results[name], changes.get(name), records[name]) for name in specs]
    seconds = time.perf_counter() - start
    write_csv(cfg.out / "summary.csv", rows)
    write_text(cfg.out / "summary.md", markdown(rows, items, cfg, seconds))
    write_csv(cfg.out / "paired.csv", [{"method": n, "measure": k, **{kk: vv for kk, vv in v.items()
                                                                       if not isinstance(vv, (dict, list))},
                                        **{kk: vv for kk, vv in v.items() if isinstance(vv, list)}}
                                       for n, c in changes.items() for k, v in c.items() if v])
    plot(changes, cfg.out / "bias_vs_capability.png")
    write_json(cfg.out / "metrics.json", {
        "models": specs, "changes": changes,
        "levels": {n: {k: r[k] for k in ("stereoset", "crows", "bbq", "perplexity", "source", "eval_seconds")}
                   for n, r in results.items()},
        "method_records": {n: {k: v for k, v in r.items() if k != "provenance"} for n, r in records.items()},
        "neutral_texts": texts_provenance(items.neutral), "wall_seconds": round(seconds, 1),
        "provenance": provenance(cfg, [cfg.stereoset, cfg.crows, *items.bbq_files])})
    print(markdown(rows, items, cfg, seconds))


if __name__ == "__main__":
    run_script(main, Config())
