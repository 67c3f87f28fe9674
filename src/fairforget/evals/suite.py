"""The held-out suite: the items every model or method is judged on, each model scored once (cached by the
digest of its weights), and each pairing against "before" through every evaluation's ``compare``.

Items (:func:`held_out_items`): StereoSet dev's held-out half (a proportional sample for overall SS / LMS,
plus every held-out gender example, or a seeded ``gender_limit`` of them), CrowS-Pairs (a proportional sample
for "all", plus every gender pair), WinoBias's test pairs, the BBQ scenarios head pruning holds out (the same
``split_seed``, so head pruning never saw them: a per-category sample for "overall", plus a ``bbq_gender_limit``
sample of their Gender_identity examples for BBQ gender; or the BBQ items a stage supplies) and the neutral
held-out texts for perplexity. A path of None, or a size of 0, leaves an evaluation out: stage 30 scores all of them,
stage 22's controls BBQ, StereoSet, CrowS-Pairs and perplexity, PCGU's held-out report StereoSet, the CrowS
gender pairs and perplexity. The selection half of StereoSet, on which methods choose their settings, is never
among them. Every paired change carries ``mdc``, the change its items could have detected (half-width of the
paired interval under no change).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fairforget.artifacts import read_json, read_jsonl, write_json, write_jsonl
from fairforget.config import config_to_dict
from fairforget.errors import FairforgetError
from fairforget.evals.bbq import BBQ_GENDER, load_bbq, sample_per_category
from fairforget.evals.bbq_metrics import item_key, summarize
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.evals.crows import compute_metrics as crows_metrics
from fairforget.evals.perplexity import load_neutral_texts
from fairforget.evals.registry import EVALUATIONS
from fairforget.evals.stereoset import compute_metrics, decisions, stratified_limit
from fairforget.hashing import Hasher
from fairforget.scoring import BodyOutputs, reused_body_outputs
from fairforget.stats import bootstrap_ci, mcnemar, minimum_detectable_change

SCORED = ("stereoset", "crows", "winobias", "bbq", "perplexity")  # Items fields, by evaluation name


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite scores and how (a stage builds it from its own Config)."""

    stereoset: Path | None  # None: no StereoSet
    crows: Path | None
    winobias: Path | None  # the WinoBias data folder (its test files)
    bbq_dir: Path | None  # None: the BBQ items are the caller's (stage 22's split) or none
    stereoset_limit: int | None = 300  # the proportional held-out sample (None: all, 0: none)
    gender_limit: int | None = None  # held-out gender examples (None: every one, 0: none)
    crows_limit: int | None = 200  # the proportional sample for "all" (0: none)
    crows_gender: bool = True  # every gender pair besides
    winobias_limit: int | None = None
    bbq_per_category: int | None = 8
    bbq_gender_limit: int | None = 0  # held-out Gender_identity examples besides (None: every one, 0: no BBQ gender)
    ppl_limit: int | None = 50  # neutral held-out texts (0: none)
    half_seed: int = 0
    split_seed: int = 0
    mitigation_fraction: float = 0.5
    bbq_mode: str = "answer"
    chat_template: str = "auto"
    permutations: str = "none"
    batch_size: int = 32
    bbq_batch_size: int | None = None  # None: half the batch
    ppl_batch_size: int | None = None  # None: a quarter of the batch
    wrapper_batch_size: int = 4  # scoring wrappers keep [batch, length, vocab] distributions
    n_boot: int = 1000
    seed: int = 0
    device: str = "auto"


@dataclass
class Items:
    """The held-out items every model is scored on (an empty list: that evaluation is not scored)."""

    stereoset: list  # the proportional sample plus the held-out gender examples
    stereoset_sample: set[str]  # ids of the proportional sample (overall SS, LMS)
    crows: list  # the proportional sample plus every gender pair
    crows_sample: set[str]  # ids of the proportional sample (all bias types)
    winobias: list
    bbq: list  # the per-category sample plus the held-out Gender_identity examples
    neutral: list[str]
    bbq_files: list[Path] = field(default_factory=list)
    bbq_sample: set[tuple[str, int]] = field(default_factory=set)  # (category, example_id) of the per-category sample

    @property
    def perplexity(self) -> list[str]:
        return self.neutral

    def sizes(self) -> dict[str, int]:
        return {"bbq": len(self.bbq), "bbq_overall": len(self.bbq_sample), "stereoset": len(self.stereoset),
                "stereoset_gender": sum(e.bias_type == "gender" for e in self.stereoset),
                "stereoset_overall": len(self.stereoset_sample), "crows": len(self.crows),
                "perplexity_texts": len(self.neutral), **({"winobias": len(self.winobias)} if self.winobias else {})}

    def only(self, *names: str) -> "Items":
        """The same items with every evaluation but ``names`` left out."""
        field_of = {"perplexity": "neutral"}
        return replace(self, **{field_of.get(name, name): [] for name in SCORED if name not in names})


def _limited(examples: list, limit: int | None, seed: int) -> list:
    return [] if limit == 0 else stratified_limit(examples, limit, seed)


def held_out_items(cfg: SuiteConfig, bbq: list | None = None) -> Items:
    """The suite's items (module docstring); ``bbq``: the caller's BBQ items instead of the held-out split's."""
    stereo, ids = [], set()
    if cfg.stereoset is not None:
        heldout = EVALUATIONS["stereoset"].load(cfg.stereoset, "heldout", cfg.half_seed).examples
        sample = _limited(heldout, cfg.stereoset_limit, cfg.seed)
        ids = {e.id for e in sample}
        gender = _limited([e for e in heldout if e.bias_type == "gender"], cfg.gender_limit, cfg.seed)
        stereo = sample + [e for e in gender if e.id not in ids]
    crows, crows_ids = [], set()
    if cfg.crows is not None:
        crows = EVALUATIONS["crows"].load(cfg.crows, cfg.crows_limit, cfg.seed).examples if cfg.crows_limit != 0 else []
        crows_ids = {p.id for p in crows}
        if cfg.crows_gender:
            crows += [p for p in EVALUATIONS["crows"].load(cfg.crows, None, cfg.seed, ["gender"]).examples
                      if p.id not in crows_ids]
    winobias = [] if cfg.winobias is None else \
        EVALUATIONS["winobias"].load(cfg.winobias, limit=cfg.winobias_limit, seed=cfg.seed).examples
    files: list[Path] = []
    if bbq is not None:
        bbq, bbq_ids = list(bbq), {bbq_key(e) for e in bbq}
    elif cfg.bbq_dir is not None:
        data = load_bbq(cfg.bbq_dir)
        _, held = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)
        bbq, files = sample_per_category(held, cfg.bbq_per_category, cfg.split_seed), list(data.files)
        bbq_ids = {bbq_key(e) for e in bbq}
        if cfg.bbq_gender_limit != 0:
            gender = sample_per_category([e for e in held if e.category == BBQ_GENDER], cfg.bbq_gender_limit,
                                         cfg.split_seed)
            bbq += [e for e in gender if bbq_key(e) not in bbq_ids]
    else:
        bbq, bbq_ids = [], set()
    neutral = [] if cfg.ppl_limit == 0 else load_neutral_texts("heldout", cfg.ppl_limit)
    return Items(stereo, ids, crows, crows_ids, winobias, bbq, neutral, files, bbq_ids)


def bbq_key(example: Any) -> tuple[str, int]:
    """A BBQ example's identity, as :func:`~fairforget.evals.bbq_metrics.item_key` gives its scored item's."""
    return example.category, int(example.example_id)


def score_items(model: Any, tokenizer: Any, items: Items, cfg: SuiteConfig, wrapper: bool = False) -> dict:
    """``{evaluation: (metrics, per-item records)}`` of one model on every evaluation ``items`` holds, each
    through its registered ``evaluate`` (``wrapper``: a scoring wrapper, smaller batches)."""
    batch = cfg.wrapper_batch_size if wrapper else cfg.batch_size
    options = {"stereoset": {"batch_size": batch}, "crows": {"batch_size": batch}, "winobias": {"batch_size": batch},
               "bbq": {"mode": cfg.bbq_mode, "chat_template": cfg.chat_template, "permutations": cfg.permutations,
                       "batch_size": cfg.bbq_batch_size or max(1, batch // 2)},
               "perplexity": {"batch_size": cfg.ppl_batch_size or max(1, batch // 4)}}
    return {name: EVALUATIONS[name].evaluate(model, tokenizer, getattr(items, name), n_boot=cfg.n_boot,
                                             seed=cfg.seed, **options[name])
            for name in SCORED if getattr(items, name)}


def weights_digest(spec: str) -> str:
    """What a model's scores depend on: the sha256 of its folder (weights, configs, an adapter's or wrapper's
    settings), or the spec itself for a hub id."""
    return Hasher().path(Path(spec)) or spec


def score_model(name: str, spec: str, items: Items, cfg: SuiteConfig, cache: Path, load: Callable,
                wrapper: bool = False, shared: BodyOutputs | None = None) -> dict:
    """:func:`score_items` of one model (``load(spec, device)``), reusing ``cache/<digest>/`` when the same
    weights were scored with the same settings, and the body outputs in ``shared`` when its body has their
    weights (only its head then runs); adds ``source`` and ``eval_seconds``."""
    digest = weights_digest(spec)
    folder = cache / digest[:16]
    settings = {"weights_sha256": digest, **{k: v for k, v in config_to_dict(cfg).items() if k != "device"}}
    done = folder / "eval.json"
    if done.is_file() and read_json(done).get("settings") == settings:
        print(f"{name}: reusing the scores in {folder}", flush=True)
        record = read_json(done)
    else:
        start = time.perf_counter()
        loaded = load(spec, cfg.device)
        with reused_body_outputs(loaded.model, shared) if shared is not None else nullcontext(False) as reused:
            print(f"{name}: scoring {loaded.source}" + (" (the body's outputs are stored ones: its head alone "
                                                        "differs)" if reused and shared.outputs else ""), flush=True)
            scores = score_items(loaded.model, loaded.tokenizer, items, cfg, wrapper)
        for evaluation, (_, scored) in scores.items():
            write_jsonl(folder / f"{evaluation}_items.jsonl", scored)
        record = {"settings": settings, "source": loaded.source, "eval_seconds": round(time.perf_counter() - start, 1),
                  "metrics": {evaluation: metrics for evaluation, (metrics, _) in scores.items()}}
        write_json(done, record)
        print(f"{name}: scored in {record['eval_seconds']:.0f} s", flush=True)
    scores = {evaluation: (metrics, read_jsonl(folder / f"{evaluation}_items.jsonl"))
              for evaluation, metrics in record["metrics"].items()}
    return {"source": record["source"], "eval_seconds": record["eval_seconds"], "scores": scores}


def in_sample(stereo_items: list[dict], items: Items) -> list[dict]:
    return [it for it in stereo_items if it["example_id"] in items.stereoset_sample]


def in_crows_sample(crows_items: list[dict], items: Items) -> list[dict]:
    return [it for it in crows_items if it["id"] in items.crows_sample]


def of_gender(scored: list[dict]) -> list[dict]:
    return [it for it in scored if it["bias_type"] == "gender"]


def in_bbq_sample(bbq_items: list[dict], items: Items) -> list[dict]:
    return [it for it in bbq_items if item_key(it) in items.bbq_sample]


def of_bbq_gender(bbq_items: list[dict]) -> list[dict]:
    return [it for it in bbq_items if it["category"] == BBQ_GENDER]


def bbq_levels(bbq: tuple[dict, list[dict]], items: Items, cfg: SuiteConfig) -> dict:
    """BBQ "overall" on the per-category sample and, with ``bbq_gender_limit``, "gender" on every Gender_identity
    item scored (the sample's and the extra held-out ones)."""
    metrics, scored = bbq
    sample = in_bbq_sample(scored, items)
    found = {"mode": metrics["mode"], "answer_norm": metrics["answer_norm"], "n_items": len(sample),
             "overall": summarize(sample, cfg.n_boot, cfg.seed)}
    if cfg.bbq_gender_limit != 0:
        found["gender"] = summarize(of_bbq_gender(scored), cfg.n_boot, cfg.seed)
    return found


def crows_levels(crows_items: list[dict], items: Items, cfg: SuiteConfig) -> dict:
    """CrowS "all" on the proportional sample, "gender" on every gender pair."""
    return {"overall": crows_metrics(in_crows_sample(crows_items, items), cfg.n_boot, cfg.seed)["overall"],
            "gender": crows_metrics(of_gender(crows_items), cfg.n_boot, cfg.seed)["overall"]}


def stereoset_levels(stereo_items: list[dict], items: Items, cfg: SuiteConfig) -> dict:
    """Overall SS / LMS on the proportional sample, gender SS on the held-out gender examples scored."""
    overall = compute_metrics(in_sample(stereo_items, items), cfg.n_boot, cfg.seed)["overall"]["all"]
    gender = compute_metrics(of_gender(stereo_items), cfg.n_boot, cfg.seed)["overall"]["gender"]
    return {"all": overall, "gender": gender}


def levels(scored: dict, items: Items, cfg: SuiteConfig) -> dict:
    """Stage 30's levels of one model (:func:`score_model`'s result), with its items as ``<evaluation>_items``."""
    s = scored["scores"]
    return {"source": scored["source"], "eval_seconds": scored["eval_seconds"],
            "stereoset": stereoset_levels(s["stereoset"][1], items, cfg), "crows": crows_levels(s["crows"][1], items, cfg),
            "winobias": s["winobias"][0],
            "bbq": bbq_levels(s["bbq"], items, cfg),
            "perplexity": s["perplexity"][0], **{f"{name}_items": s[name][1] for name in SCORED}}


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


def compare(name: str, before: list[dict], after: list[dict], cfg: SuiteConfig,
            keep: Callable[[list[dict]], list[dict]] = list) -> dict:
    """Evaluation ``name``'s paired comparison of two models' items (each narrowed by ``keep``)."""
    return EVALUATIONS[name].compare(keep(before), keep(after), cfg.n_boot, cfg.seed)


def paired(before: dict, after: dict, items: Items, cfg: SuiteConfig) -> dict:
    """Stage 30's paired comparisons of one model against the before model (:func:`levels` of each)."""
    sample = lambda scored: in_sample(scored, items)  # noqa: E731
    return {"ss_gender_distance": distance_change(before["stereoset_items"], after["stereoset_items"], "gender",
                                                  cfg.n_boot, cfg.seed),
            "ss_overall": compare("stereoset", before["stereoset_items"], after["stereoset_items"], cfg,
                                  sample)["overall"],
            "crows_all": compare("crows", before["crows_items"], after["crows_items"], cfg,
                                 lambda scored: in_crows_sample(scored, items))["overall"],
            "crows_gender": compare("crows", before["crows_items"], after["crows_items"], cfg, of_gender)["overall"],
            "winobias": compare("winobias", before["winobias_items"], after["winobias_items"], cfg)["overall"],
            "bbq": compare("bbq", before["bbq_items"], after["bbq_items"], cfg,
                           lambda scored: in_bbq_sample(scored, items))["overall"],
            **({"bbq_gender": bbq_gender_change(compare("bbq", before["bbq_items"], after["bbq_items"], cfg,
                                                        of_bbq_gender)["overall"])}
               if cfg.bbq_gender_limit != 0 else {}),
            "perplexity": compare("perplexity", before["perplexity_items"], after["perplexity_items"], cfg)["overall"]}


def bbq_gender_change(comparison: dict) -> dict:
    """BBQ gender's paired comparison read as a bias measure like the others: ``delta`` is the change in
    Gender_identity s_AMB (with ``delta_ci``, ``mdc`` and McNemar ``p_value`` on the biased answers)."""
    return {**comparison, "delta": comparison["s_amb_delta"], "delta_ci": comparison["s_amb_delta_ci"],
            "mdc": comparison["mdc"]["s_amb"], "p_value": comparison["mcnemar_biased"]["p_value"]}


def score_all(models: dict[str, str], items: Items, cfg: SuiteConfig, cache: Path, load: Callable,
              is_wrapper: Callable[[str], bool]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every model's levels (the first is "before"), and each other model's paired changes against it. A model
    whose body has the weights of the first one scored here reuses that body's outputs."""
    shared = BodyOutputs()
    results = {name: levels(score_model(name, spec, items, cfg, cache, load, is_wrapper(spec), shared), items, cfg)
               for name, spec in models.items()}
    before = next(iter(results))
    changes = {name: paired(results[before], r, items, cfg) for name, r in results.items() if name != before}
    return results, changes
