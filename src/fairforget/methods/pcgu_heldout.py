"""PCGU's held-out report (stage 12): the start model's cached scores, the kept model's, and their paired comparison."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairforget.artifacts import read_json, read_jsonl, write_json, write_jsonl
from fairforget.provenance import provenance
from fairforget.errors import FairforgetError
from fairforget.evals.crows import compare_runs as crows_compare
from fairforget.evals.crows import compute_metrics as crows_metrics
from fairforget.evals.crows import load_crows, score_pairs
from fairforget.evals.generation import complete, load_prompts, pronoun_counts
from fairforget.evals.perplexity import load_neutral_texts, perplexity, perplexity_change, texts_provenance
from fairforget.evals.stereoset import compare_runs, compute_metrics, load_stereoset, score_examples, select_half, \
    stratified_limit
from fairforget.models import load_model, model_name


@dataclass
class HeldOut:
    """The held-out material and the start model's scores on it."""

    examples: list
    gender_ids: set[str]
    sample_ids: set[str]
    texts: list[str]
    before: dict[str, Any]


def heldout_examples(cfg: Any) -> tuple[list, set[str], set[str]]:
    """Every held-out gender example plus a ``--heldout-limit`` sample of the held-out half: (union, gender ids,
    sample ids)."""
    half = select_half(load_stereoset(cfg.stereoset), "heldout", cfg.half_seed)
    gender = [e for e in half if e.bias_type == "gender"] if cfg.heldout_gender else []
    sample = stratified_limit(half, cfg.heldout_limit, cfg.sample_seed) if cfg.heldout_limit else []
    union = {e.id: e for e in gender + sample}
    return list(union.values()), {e.id for e in gender}, {e.id for e in sample}


def heldout_scores(model: Any, tokenizer: Any, cfg: Any, examples: list, texts: list[str],
                   parts: tuple[str, ...] = ("items", "perplexity", "crows", "completions")) -> dict[str, Any]:
    """Per-sentence StereoSet items, perplexity, CrowS-Pairs gender items and greedy completions of one model."""
    scores: dict[str, Any] = {}
    if "items" in parts:
        scores["items"] = score_examples(model, tokenizer, examples, cfg.eval_batch_size)
    if "perplexity" in parts:
        scores["perplexity"] = perplexity(model, tokenizer, texts, cfg.eval_batch_size, cfg.n_boot, cfg.sample_seed)
    if "crows" in parts and cfg.crows is not None:
        gender = [p for p in load_crows(cfg.crows) if p.bias_type == "gender"]
        scores["crows"] = score_pairs(model, tokenizer, gender, cfg.eval_batch_size)
    if "completions" in parts and cfg.completion_tokens > 0:
        texts_out = complete(model, tokenizer, load_prompts(None), "greedy", cfg.completion_tokens)
        scores["completions"] = {"texts": texts_out, **pronoun_counts(texts_out)}
    return scores


def start_scores(model: Any, tokenizer: Any, cfg: Any, examples: list, texts: list[str]) -> dict[str, Any]:
    """The start model's held-out scores, from the cache where it holds them for the same model and material
    (StereoSet items per example, so a run on a subset of the cached examples scores nothing again)."""
    cache = cfg.start_cache or Path("outputs/pcgu") / f"start-{model_name(cfg.model)}"
    key = {"model": cfg.model, "stereoset": str(cfg.stereoset), "half_seed": cfg.half_seed,
           "texts": texts_provenance(texts)["sha256"], "eval_batch_size": cfg.eval_batch_size}
    fresh = (cache / "key.json").is_file() and read_json(cache / "key.json") == key
    cached = read_jsonl(cache / "items.jsonl") if fresh else []
    wanted = {e.id for e in examples}
    if not wanted <= {i["example_id"] for i in cached} or not (cache / "perplexity.json").is_file():
        cached = [i for i in cached if i["example_id"] not in wanted] + \
            heldout_scores(model, tokenizer, cfg, examples, texts, ("items",))["items"]
        write_jsonl(cache / "items.jsonl", cached)
        if not fresh or not (cache / "perplexity.json").is_file():
            write_json(cache / "perplexity.json", heldout_scores(model, tokenizer, cfg, examples, texts,
                                                                 ("perplexity",))["perplexity"])
        write_json(cache / "key.json", key)
    scores = {"items": [i for i in cached if i["example_id"] in wanted],
              "perplexity": read_json(cache / "perplexity.json")}
    for part, setting in (("crows", cfg.crows), ("completions", cfg.completion_tokens)):
        if not setting:  # that part is off
            continue
        part_key = {**key, part: str(setting)}
        if (cache / f"{part}.json").is_file() and read_json(cache / f"{part}.json")["key"] == part_key:
            scores.update(read_json(cache / f"{part}.json")["scores"])
            continue
        extra = heldout_scores(model, tokenizer, cfg, examples, texts, (part,))
        write_json(cache / f"{part}.json", {"key": part_key, "scores": extra})
        scores.update(extra)
    return scores


def heldout_report(before: dict, after: dict, gender_ids: set[str], sample_ids: set[str], cfg: Any) -> dict:
    """Gender SS on every held-out gender example and overall SS / LMS on the sample, before and after, with
    paired McNemar tests, and the perplexity change on the neutral held-out texts."""
    report: dict[str, Any] = {}
    for name, ids in (("gender", gender_ids), ("overall", sample_ids)):
        if not ids:
            continue
        part = {}
        for when, scores in (("before", before), ("after", after)):
            items = [i for i in scores["items"] if i["example_id"] in ids]
            m = compute_metrics(items, cfg.n_boot, cfg.sample_seed)["overall"]["all"]
            part[when] = {key: m[key] for key in ("n", "ss", "ss_ci", "lms", "lms_ci", "icat", "ss_micro")}
        paired = compare_runs([i for i in before["items"] if i["example_id"] in ids],
                              [i for i in after["items"] if i["example_id"] in ids], cfg.n_boot,
                              cfg.sample_seed)["overall"]
        part["paired"] = paired
        report[name] = part
    pb, pa = before["perplexity"], after.get("perplexity")
    report["perplexity"] = None if pa is None else {"before": pb["perplexity"], "before_ci": pb["perplexity_ci"], "after": pa["perplexity"],
                            "after_ci": pa["perplexity_ci"], "n_texts": pb["n_texts"], "n_tokens": pb["n_tokens"],
                            **perplexity_change(pb, pa, cfg.n_boot, cfg.sample_seed)}
    if "crows" in before and "crows" in after:
        report["crows_gender"] = {"before": crows_metrics(before["crows"], cfg.n_boot, cfg.sample_seed)["overall"],
                                  "after": crows_metrics(after["crows"], cfg.n_boot, cfg.sample_seed)["overall"],
                                  "paired": crows_compare(before["crows"], after["crows"], cfg.n_boot,
                                                          cfg.sample_seed)["overall"]}
    if "completions" in before and "completions" in after:
        report["completions"] = {when: scores["completions"] for when, scores in (("before", before), ("after", after))}
    return report


def start_heldout(model: Any, tokenizer: Any, cfg: Any) -> HeldOut | None:
    """The held-out material and the start model's scores on it (``--heldout-eval``), else None."""
    if not cfg.heldout_eval:
        return None
    examples, gender_ids, sample_ids = heldout_examples(cfg)
    texts = load_neutral_texts("heldout", cfg.perplexity_texts)
    return HeldOut(examples, gender_ids, sample_ids, texts, start_scores(model, tokenizer, cfg, examples, texts))


def write_eval_only(held: HeldOut | None, cfg: Any, log_dir: Path) -> None:
    """``--eval-only``: the held-out report of that model folder against the start, in ``summary.json``."""
    if held is None:
        raise FairforgetError("--eval-only needs --heldout-eval")
    kept = load_model(str(cfg.eval_only), cfg.device)
    after = heldout_scores(kept.model, kept.tokenizer, cfg, held.examples, held.texts,
                           ("items", "crows", "completions"))
    report = {**heldout_report(held.before, after, held.gender_ids, held.sample_ids, cfg),
              "texts": texts_provenance(held.texts)}
    write_json(log_dir / "summary.json", {"eval_only": str(cfg.eval_only), "heldout": report,
                                          "provenance": provenance(cfg, [cfg.stereoset])})
    print(f"held-out report of {cfg.eval_only} -> {log_dir / 'summary.json'}")


def kept_heldout(held: HeldOut, cfg: Any, log_dir: Path) -> dict[str, Any]:
    """Score the kept model (``cfg.out``), write its items and print the report; returns the report."""
    kept = load_model(str(cfg.out), cfg.device)
    after = heldout_scores(kept.model, kept.tokenizer, cfg, held.examples, held.texts)
    write_jsonl(log_dir / "heldout_items.jsonl", after["items"])
    report = heldout_report(held.before, after, held.gender_ids, held.sample_ids, cfg)
    report["texts"] = texts_provenance(held.texts)
    parts = [f"{name} SS {r['before']['ss']:.2f} -> {r['after']['ss']:.2f} [{r['after']['ss_ci'][0]:.2f}, "
             f"{r['after']['ss_ci'][1]:.2f}] (n {r['after']['n']}, McNemar p {r['paired']['p_value']:.3g}), "
             f"LMS {r['before']['lms']:.2f} -> {r['after']['lms']:.2f}"
             for name, r in (("held-out gender", report.get("gender")), ("overall", report.get("overall"))) if r]
    ppl = report["perplexity"]
    print("; ".join(parts + [f"perplexity {ppl['before']:.2f} -> {ppl['after']:.2f}"]), flush=True)
    return report
