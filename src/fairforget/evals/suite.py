"""The held-out suite: the items every model or method is judged on, each model scored once (cached by the
digest of its weights), and each pairing against "before" through every evaluation's ``compare``.

Items: StereoSet dev's held-out half (a proportional sample for overall SS / LMS, plus every held-out gender
example, or a seeded ``gender_limit`` of them), CrowS-Pairs (a proportional sample for "all", plus every gender
pair), WinoBias's test pairs, the BBQ scenarios head pruning holds out (the same ``split_seed``, so head pruning
never saw them) and the neutral held-out texts for perplexity. The selection half of StereoSet, on which
methods choose their settings, is never among them. Every paired change carries ``mdc``, the change its items
could have detected (half-width of the paired interval under no change).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fairforget.artifacts import read_json, read_jsonl, write_json, write_jsonl
from fairforget.errors import FairforgetError
from fairforget.evals.bbq import load_bbq, sample_per_category
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.evals.crows import compute_metrics as crows_metrics
from fairforget.evals.perplexity import load_neutral_texts, perplexity, perplexity_change
from fairforget.evals.registry import EVALUATIONS
from fairforget.evals.stereoset import compute_metrics, decisions, stratified_limit
from fairforget.hashing import Hasher
from fairforget.stats import bootstrap_ci, mcnemar, minimum_detectable_change

EVALUATIONS_SCORED = ("stereoset", "crows", "winobias", "bbq")  # beside perplexity


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite scores and how (a stage builds it from its own Config)."""

    stereoset: Path
    crows: Path
    winobias: Path  # the WinoBias data folder (its test files)
    bbq_dir: Path
    stereoset_limit: int | None = 300  # the proportional held-out sample (None: all)
    gender_limit: int | None = None  # held-out gender examples (None: every one)
    crows_limit: int | None = 200  # the proportional sample for "all" (every gender pair besides)
    winobias_limit: int | None = None
    bbq_per_category: int | None = 8
    ppl_limit: int | None = 50
    half_seed: int = 0
    split_seed: int = 0
    mitigation_fraction: float = 0.5
    batch_size: int = 32
    wrapper_batch_size: int = 4  # scoring wrappers keep [batch, length, vocab] distributions
    n_boot: int = 1000
    seed: int = 0
    device: str = "auto"


@dataclass
class Items:
    """The held-out items every model is scored on."""

    stereoset: list  # the proportional sample plus every held-out gender example
    stereoset_sample: set[str]  # ids of the proportional sample (overall SS, LMS)
    crows: list  # the proportional sample plus every gender pair
    crows_sample: set[str]  # ids of the proportional sample (all bias types)
    winobias: list
    bbq: list
    neutral: list[str]
    bbq_files: list[Path]


def held_out_items(cfg: SuiteConfig) -> Items:
    """The suite's items (module docstring)."""
    heldout = EVALUATIONS["stereoset"].load(cfg.stereoset, "heldout", cfg.half_seed).examples
    sample = stratified_limit(heldout, cfg.stereoset_limit, cfg.seed)
    ids = {e.id for e in sample}
    gender = stratified_limit([e for e in heldout if e.bias_type == "gender"], cfg.gender_limit, cfg.seed)
    stereo = sample + [e for e in gender if e.id not in ids]
    crows = EVALUATIONS["crows"].load(cfg.crows, cfg.crows_limit, cfg.seed).examples
    crows_ids = {p.id for p in crows}
    crows += [p for p in EVALUATIONS["crows"].load(cfg.crows, None, cfg.seed, ["gender"]).examples
              if p.id not in crows_ids]
    winobias = EVALUATIONS["winobias"].load(cfg.winobias, limit=cfg.winobias_limit, seed=cfg.seed).examples
    data = load_bbq(cfg.bbq_dir)
    _, held = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)
    bbq = sample_per_category(held, cfg.bbq_per_category, cfg.split_seed)
    return Items(stereo, ids, crows, crows_ids, winobias, bbq, load_neutral_texts("heldout", cfg.ppl_limit),
                 list(data.files))


def weights_digest(spec: str) -> str:
    """What a model's scores depend on: the sha256 of its folder (weights, configs, an adapter's or wrapper's
    settings), or the spec itself for a hub id."""
    return Hasher().path(Path(spec)) or spec


CACHE_SETTINGS = ("stereoset_limit", "gender_limit", "crows_limit", "winobias_limit", "bbq_per_category", "ppl_limit",
                  "half_seed", "split_seed", "mitigation_fraction", "n_boot", "seed")


def score_model(name: str, spec: str, items: Items, cfg: SuiteConfig, cache: Path, load: Callable,
                wrapper: bool = False) -> dict:
    """Score one model (``load(spec, device)``; ``wrapper``: a scoring wrapper, smaller batches) on every
    evaluation; reuse ``cache/<digest>/`` when the same weights were scored with the same settings."""
    digest = weights_digest(spec)
    folder = cache / digest[:16]
    settings = {"weights_sha256": digest, **{k: getattr(cfg, k) for k in CACHE_SETTINGS}}
    done = folder / "eval.json"
    if done.is_file() and read_json(done).get("settings") == settings:
        print(f"{name}: reusing the scores in {folder}", flush=True)
        result = read_json(done)
    else:
        start = time.perf_counter()
        loaded = load(spec, cfg.device)
        batch = cfg.wrapper_batch_size if wrapper else cfg.batch_size
        print(f"{name}: scoring {loaded.source}", flush=True)
        options = {"stereoset": {"batch_size": batch}, "crows": {"batch_size": batch},
                   "winobias": {"batch_size": batch}, "bbq": {"mode": "answer", "batch_size": max(1, batch // 2)}}
        metrics, scored = {}, {}
        for evaluation in EVALUATIONS_SCORED:
            metrics[evaluation], scored[evaluation] = EVALUATIONS[evaluation].evaluate(
                loaded.model, loaded.tokenizer, getattr(items, evaluation), n_boot=cfg.n_boot, seed=cfg.seed,
                **options[evaluation])
            write_jsonl(folder / f"{evaluation}_items.jsonl", scored[evaluation])
        ppl = perplexity(loaded.model, loaded.tokenizer, items.neutral, max(1, batch // 4), cfg.n_boot, cfg.seed)
        result = {"settings": settings, "source": loaded.source, "eval_seconds": round(time.perf_counter() - start, 1),
                  "stereoset": stereoset_levels(scored["stereoset"], items, cfg),
                  "crows": crows_levels(scored["crows"], items, cfg), "winobias": metrics["winobias"],
                  "bbq": {k: metrics["bbq"][k] for k in ("overall", "mode", "answer_norm", "n_items")},
                  "perplexity": ppl}
        write_json(done, result)
        print(f"{name}: scored in {result['eval_seconds']:.0f} s", flush=True)
    for evaluation in EVALUATIONS_SCORED:
        result[f"{evaluation}_items"] = read_jsonl(folder / f"{evaluation}_items.jsonl")
    return result


def in_sample(stereo_items: list[dict], items: Items) -> list[dict]:
    return [it for it in stereo_items if it["example_id"] in items.stereoset_sample]


def in_crows_sample(crows_items: list[dict], items: Items) -> list[dict]:
    return [it for it in crows_items if it["id"] in items.crows_sample]


def crows_levels(crows_items: list[dict], items: Items, cfg: SuiteConfig) -> dict:
    """CrowS "all" on the proportional sample, "gender" on every gender pair."""
    metric = crows_metrics
    return {"overall": metric(in_crows_sample(crows_items, items), cfg.n_boot, cfg.seed)["overall"],
            "gender": metric([it for it in crows_items if it["bias_type"] == "gender"], cfg.n_boot,
                             cfg.seed)["overall"]}


def stereoset_levels(stereo_items: list[dict], items: Items, cfg: SuiteConfig) -> dict:
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
            "p_value": mcnemar(b.pro, a.pro).p_value, "n": len(every),
            "mdc": 100 * minimum_detectable_change(b.pro, a.pro)}


def paired(before: dict, after: dict, items: Items, cfg: SuiteConfig) -> dict:
    """Every paired comparison of one model against the before model, through each evaluation's ``compare``."""
    compare = {name: EVALUATIONS[name].compare for name in EVALUATIONS_SCORED}
    stereo = compare["stereoset"](in_sample(before["stereoset_items"], items),
                                  in_sample(after["stereoset_items"], items), cfg.n_boot, cfg.seed)
    crows_all = compare["crows"](in_crows_sample(before["crows_items"], items),
                                 in_crows_sample(after["crows_items"], items), cfg.n_boot, cfg.seed)["overall"]
    crows_gender = compare["crows"](*([it for it in run["crows_items"] if it["bias_type"] == "gender"]
                                      for run in (before, after)), cfg.n_boot, cfg.seed)["overall"]
    winobias = compare["winobias"](before["winobias_items"], after["winobias_items"], cfg.n_boot, cfg.seed)
    bbq = compare["bbq"](before["bbq_items"], after["bbq_items"], cfg.n_boot, cfg.seed)["overall"]
    return {"ss_gender_distance": distance_change(before["stereoset_items"], after["stereoset_items"], "gender",
                                                  cfg.n_boot, cfg.seed),
            "ss_overall": stereo["overall"], "crows_all": crows_all, "crows_gender": crows_gender,
            "winobias": winobias["overall"], "bbq": bbq, "perplexity": perplexity_change(before["perplexity"], after["perplexity"], cfg.n_boot,
                                                        cfg.seed)}


def score_all(models: dict[str, str], items: Items, cfg: SuiteConfig, cache: Path, load: Callable,
              is_wrapper: Callable[[str], bool]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every model's scores (the first is "before"), and each other model's paired changes against it."""
    results = {name: score_model(name, spec, items, cfg, cache, load, is_wrapper(spec)) for name, spec in models.items()}
    before = next(iter(results))
    changes = {name: paired(results[before], r, items, cfg) for name, r in results.items() if name != before}
    return results, changes
