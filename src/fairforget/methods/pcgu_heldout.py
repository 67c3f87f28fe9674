"""PCGU's held-out report (stage 12): the start model's and the kept model's scores on the held-out suite
(:mod:`fairforget.evals.suite`: every held-out StereoSet gender example plus a ``heldout_limit`` sample of the
held-out half, the CrowS-Pairs gender pairs, the neutral held-out texts), their paired comparison through
the suite, and greedy completions of the built-in prompts. The start model's scores are cached by the suite
(by weights digest, under ``start_cache``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairforget.artifacts import write_json, write_jsonl
from fairforget.evals.generation import complete, load_prompts, pronoun_counts
from fairforget.evals.perplexity import texts_provenance
from fairforget.evals.stereoset import compute_metrics
from fairforget.evals.suite import Items, SuiteConfig, compare, held_out_items, in_sample, of_gender, score_items, \
    score_model
from fairforget.models import load_model, model_name


@dataclass(frozen=True)
class HeldOutConfig:
    """The held-out report's settings (stage 12's flags of the same names)."""

    model: str
    stereoset: Path
    crows: Path | None  # None: no CrowS-Pairs gender pairs
    heldout_limit: int  # the overall sample (0: none)
    heldout_gender: bool  # every held-out gender example
    perplexity_texts: int
    completion_tokens: int  # 0: no completions
    start_cache: Path | None  # default outputs/pcgu/start-<model>
    half_seed: int
    eval_batch_size: int
    n_boot: int
    sample_seed: int
    device: str

    def suite(self) -> SuiteConfig:
        return SuiteConfig(self.stereoset, self.crows, None, None, stereoset_limit=self.heldout_limit,
                           gender_limit=None if self.heldout_gender else 0, crows_limit=0, crows_gender=True,
                           ppl_limit=self.perplexity_texts, half_seed=self.half_seed, batch_size=self.eval_batch_size,
                           ppl_batch_size=self.eval_batch_size, n_boot=self.n_boot, seed=self.sample_seed,
                           device=self.device)


@dataclass
class Start:
    """The held-out items and the start model's scores (and completions) on them."""

    items: Items
    scores: dict
    completions: dict | None


def completions(model: Any, tokenizer: Any, cfg: HeldOutConfig) -> dict | None:
    """Greedy completions of the built-in prompts and their pronoun counts (None with ``completion_tokens`` 0)."""
    if cfg.completion_tokens <= 0:
        return None
    texts = complete(model, tokenizer, load_prompts(None), "greedy", cfg.completion_tokens)
    return {"texts": texts, **pronoun_counts(texts)}


def start_heldout(loaded: Any, cfg: HeldOutConfig) -> Start:
    """The held-out items and the start model's (``loaded``) scores on them, through the suite's cache."""
    suite = cfg.suite()
    items = held_out_items(suite)
    cache = cfg.start_cache or Path("outputs/pcgu") / f"start-{model_name(cfg.model)}"
    scores = score_model("start", cfg.model, items, suite, cache, lambda spec, device: loaded)["scores"]
    return Start(items, scores, completions(loaded.model, loaded.tokenizer, cfg))


def heldout_report(start: Start, after: dict, after_completions: dict | None, cfg: HeldOutConfig) -> dict:
    """Gender SS on every held-out gender example and overall SS / LMS on the sample, before and after, with
    paired McNemar tests; the perplexity change on the neutral held-out texts; CrowS gender pairs; completions."""
    suite, items, before = cfg.suite(), start.items, start.scores
    report: dict[str, Any] = {}
    parts = (("gender", of_gender, cfg.heldout_gender), ("overall", lambda s: in_sample(s, items), cfg.heldout_limit))
    for name, keep, wanted in parts:
        if not wanted:
            continue
        part = {}
        for when, scores in (("before", before), ("after", after)):
            m = compute_metrics(keep(scores["stereoset"][1]), suite.n_boot, suite.seed)["overall"]["all"]
            part[when] = {key: m[key] for key in ("n", "ss", "ss_ci", "lms", "lms_ci", "icat", "ss_micro")}
        part["paired"] = compare("stereoset", before["stereoset"][1], after["stereoset"][1], suite, keep)["overall"]
        report[name] = part
    (pb, b_items), (pa, a_items) = before["perplexity"], after["perplexity"]
    report["perplexity"] = {"before": pb["perplexity"], "before_ci": pb["perplexity_ci"], "after": pa["perplexity"],
                            "after_ci": pa["perplexity_ci"], "n_texts": pb["n_texts"], "n_tokens": pb["n_tokens"],
                            **compare("perplexity", b_items, a_items, suite)["overall"]}
    if "crows" in before:
        report["crows_gender"] = {"before": before["crows"][0]["overall"], "after": after["crows"][0]["overall"],
                                  "paired": compare("crows", before["crows"][1], after["crows"][1], suite)["overall"]}
    if start.completions is not None:
        report["completions"] = {"before": start.completions, "after": after_completions}
    report["texts"] = texts_provenance(items.neutral)
    return report


def model_heldout(folder: Path, start: Start, cfg: HeldOutConfig, log_dir: Path) -> dict[str, Any]:
    """Score the model in ``folder``, write its StereoSet items (``heldout_items.jsonl``) and print the report
    against the start; returns the report."""
    kept = load_model(str(folder), cfg.device)
    after = score_items(kept.model, kept.tokenizer, start.items, cfg.suite())
    write_jsonl(log_dir / "heldout_items.jsonl", after["stereoset"][1])
    report = heldout_report(start, after, completions(kept.model, kept.tokenizer, cfg), cfg)
    lines = [f"{name} SS {r['before']['ss']:.2f} -> {r['after']['ss']:.2f} [{r['after']['ss_ci'][0]:.2f}, "
             f"{r['after']['ss_ci'][1]:.2f}] (n {r['after']['n']}, McNemar p {r['paired']['p_value']:.3g}), "
             f"LMS {r['before']['lms']:.2f} -> {r['after']['lms']:.2f}"
             for name, r in (("held-out gender", report.get("gender")), ("overall", report.get("overall"))) if r]
    ppl = report["perplexity"]
    print("; ".join(lines + [f"perplexity {ppl['before']:.2f} -> {ppl['after']:.2f}"]), flush=True)
    return report


def write_eval_only(folder: Path, start: Start, cfg: HeldOutConfig, log_dir: Path, provenance_block: dict) -> None:
    """``--eval-only``: the held-out report of that model folder against the start, in ``summary.json``."""
    report = model_heldout(folder, start, cfg, log_dir)
    write_json(log_dir / "summary.json", {"eval_only": str(folder), "heldout": report, "provenance": provenance_block})
    print(f"held-out report of {folder} -> {log_dir / 'summary.json'}")
