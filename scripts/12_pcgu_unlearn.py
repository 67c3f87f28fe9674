"""Partitioned Contrastive Gradient Unlearning (PCGU) on contrastive pairs, with checkpoint choice on StereoSet.

Starts from the fine-tuned adapter (merged, ``--start finetuned``) or the pretrained model (``--start base``,
as the reference does), or any ``--model``. Every batch: two backward passes give g_a, g_d over the scored
tokens (``--target-tokens``: all, the differing span, it and what follows, or only what follows); partitions
(rows or columns of each weight, each 1-D tensor whole) are ranked by the cosine of the two gradients and the
k lowest (optionally only those below ``--min-cos``) get a plain SGD step in ``--direction`` (see
``fairforget.methods.pcgu``), plus an optional retain term on neutral text (``--retain kl|lm``, ``--retain-weight``).
``--balance`` draws as many male- as female-advantaged pairs per source.

``--evals-per-epoch`` times per epoch the model is scored on the *selection* half of StereoSet dev (every
gender example with ``--selection-metric gender``, else a seeded ``--selection-limit`` sample of all) and on
the training pairs; the point with the smallest |SS - 50| is kept as ``--out`` (a loadable Hugging Face
folder). ``--stop-at-parity`` ends training at the first point where at most half of the training pairs
prefer the advantaged side. ``--heldout-eval`` then scores the start and the kept model on every held-out
gender example plus a ``--heldout-limit`` sample of the held-out half, with paired McNemar tests, and their
perplexity on the neutral held-out texts (``fairforget.evals.perplexity``); the start model's scores are cached.

Presets (flags override them): ``default`` is the predecessor's learning rate 2e-5 with the PCGU paper's
k = 10,000, batch 16, 5 epochs; ``aggressive`` takes 10x the learning rate (2e-4) and 5x the partitions
(50,000) to show what a clearly visible change does to bias and language modelling. ``configs/pcgu/*.json``
hold the ablation's configurations (``--config FILE.json``).

Writes ``<log-dir>/unlearning_log.csv`` (per step: f(adv), f(dis), their gap, partitions selected per module
type and per layer, retain loss), ``epochs.csv`` (one row per evaluation point), ``summary.json`` (with
provenance, and the held-out report) and ``unlearning.png``. The training state is saved at each evaluation
point and every ``--checkpoint-every`` steps (``<out>_checkpoints/resume/``): a killed run started again
resumes there and ends with the same model.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from fairforget.artifacts import (atomic_dir, provenance, read_json, read_jsonl, save_figure, save_model, write_csv, write_json,
                                  write_jsonl)
from fairforget.checkpoint import Checkpointer
from fairforget.config import config_to_dict, run_script
from fairforget.evals.crows import compare_runs as crows_compare
from fairforget.evals.crows import compute_metrics as crows_metrics
from fairforget.evals.crows import load_crows, score_pairs
from fairforget.errors import FairforgetError
from fairforget.evals.generation import complete, load_prompts, pronoun_counts
from fairforget.models import DEFAULT_EMBEDDED, load_model, model_name
from fairforget.pairs import balance_pairs, orientation_counts
from fairforget.methods.pcgu import (RetainTerm, encode_pairs, nonfinite_parameters, pair_gap, partition_tensors,
                             pcgu_step)
from fairforget.evals.perplexity import load_neutral_texts, perplexity, perplexity_change, texts_provenance
from fairforget.progress import progress
from fairforget.evals.stereoset import (compare_runs, compute_metrics, evaluate_stereoset, load_stereoset, score_examples,
                                  select_half, stratified_limit)
from fairforget.training import shuffled_batches
from fairforget.winogender import read_pairs_tsv

PRESETS = {
    "default": {"lr": 2e-5, "k": 10_000, "epochs": 5},
    "aggressive": {"lr": 2e-4, "k": 50_000, "epochs": 5},
}
START_MODELS = {"base": DEFAULT_EMBEDDED, "finetuned": "models/finetuned_lora"}


@dataclass
class Config:
    model: str | None = field(default=None, metadata={"help": "start model (adapter folders are merged); default "
                                                              "from --start"})
    start: Literal["base", "finetuned"] = field(
        default="finetuned", metadata={"help": "base: the pretrained model; finetuned: models/finetuned_lora"})
    pairs: Path = Path("data/processed/pairs.tsv")
    stereoset: Path = Path("data/stereoset/dev.json")
    out: Path = Path("models/debiased")
    log_dir: Path | None = field(default=None, metadata={"help": "default outputs/pcgu/<out folder name>"})
    preset: Literal["default", "aggressive"] = "default"
    lr: float | None = field(default=None, metadata={"help": "SGD learning rate (default from --preset)"})
    k: int | None = field(default=None, metadata={"help": "partitions updated per batch (default from --preset)"})
    fraction: float | None = field(default=None, metadata={"help": "instead of --k: this share of all partitions"})
    epochs: int | None = field(default=None, metadata={"help": "default from --preset"})
    batch_size: int = 16
    aggregation: Literal["rows", "columns"] = "rows"
    direction: Literal["advantaged", "disadvantaged", "both", "dynamic", "dynamic_lower"] = field(
        default="advantaged", metadata={"help": "advantaged: lower x_a; disadvantaged: raise x_d; both: theta += "
                                                "lr (g_d - g_a); dynamic: the same with each pair oriented by the "
                                                "model's current preference; dynamic_lower: lower only the "
                                                "currently preferred side"})
    target_tokens: Literal["all", "differing", "differing_after", "after"] = field(
        default="all", metadata={"help": "tokens scored in f(x): all, the differing span, it and what follows, or "
                                         "only what follows it"})
    min_cos: float | None = field(default=None, metadata={"help": "only partitions with cosine below this are "
                                                                  "candidates (0: negative cosines only)"})
    balance: Literal["none", "downsample", "upsample"] = field(
        default="none", metadata={"help": "as many male- as female-advantaged pairs per source (seeded)"})
    retain: Literal["none", "kl", "lm"] = field(
        default="none", metadata={"help": "retain term on neutral text, same step: KL to the start model or LM loss"})
    retain_weight: float = 1.0
    retain_batch_size: int = 8
    stop_at_parity: bool = field(default=False, metadata={
        "help": "stop at the first evaluation point where <= 50%% of training pairs prefer the advantaged side"})
    scope: Literal["full", "lora"] = field(default="full", metadata={"help": "lora: update only the adapter"})
    evals_per_epoch: int = field(default=1, metadata={"help": "selection evaluations (and checkpoints) per epoch"})
    selection_limit: int | None = field(default=None, metadata={"help": "seeded sample of the selection examples "
                                                                         "(speed)"})
    selection_metric: Literal["overall", "gender"] = field(
        default="gender", metadata={"help": "SS used for the |SS - 50| checkpoint choice (gender: every gender "
                                            "example of the selection half)"})
    half_seed: int = 0
    heldout_eval: bool = field(default=False, metadata={"help": "score start and kept model on the held-out half"})
    heldout_limit: int = field(default=600, metadata={"help": "held-out sample for overall SS (plus every gender "
                                                              "example; 0: gender examples only)"})
    perplexity_texts: int = field(default=100, metadata={"help": "neutral held-out texts for perplexity"})
    crows: Path | None = field(default=Path("data/crows_pairs/data/crows_pairs_anonymized.csv"),
                               metadata={"help": "CrowS-Pairs file for the gender pairs in the held-out report "
                                                 "(none: skip)"})
    completion_tokens: int = field(default=20, metadata={"help": "greedy completion length of the built-in "
                                                                 "prompts in the held-out report (0: skip)"})
    start_cache: Path | None = field(default=None, metadata={"help": "cache of the start model's held-out scores "
                                                                     "(default outputs/pcgu/start-<model>)"})
    heldout_gender: bool = field(default=True, metadata={"help": "include every held-out gender example"})
    eval_only: Path | None = field(default=None, metadata={
        "help": "no training: write the held-out report of this model folder against --model (the start)"})
    eval_batch_size: int = 32
    n_boot: int = 200
    checkpoint_every: int = field(default=10, metadata={"help": "also save the training state every N steps "
                                                                "(besides each evaluation point) so a killed run "
                                                                "resumes (0: evaluation points only)"})
    seed: int = field(default=0, metadata={"help": "training randomness: pair order and balancing draws"})
    sample_seed: int = field(default=0, metadata={"help": "evaluation samples and bootstrap, fixed across --seed so "
                                                          "seeds are compared on the same examples"})
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self) -> None:
        if self.batch_size < 1:
            raise FairforgetError("--batch-size must be at least 1")
        if self.checkpoint_every < 0:
            raise FairforgetError("--checkpoint-every must be >= 0")
        if self.lr is not None and not self.lr > 0:
            raise FairforgetError("--lr must be positive")
        if self.k is not None and self.k < 1:
            raise FairforgetError("--k must be at least 1")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise FairforgetError("--fraction must be in (0, 1]")
        if self.epochs is not None and self.epochs < 1:
            raise FairforgetError("--epochs must be at least 1")
        if self.evals_per_epoch < 1:
            raise FairforgetError("--evals-per-epoch must be at least 1")
        if self.retain_weight < 0 or self.retain_batch_size < 1:
            raise FairforgetError("--retain-weight must be >= 0 and --retain-batch-size >= 1")
        if self.eval_only is not None and not (self.eval_only / "config.json").is_file():
            raise FairforgetError(f"--eval-only {self.eval_only} is not a saved model folder")
        if self.heldout_limit < 0 or self.perplexity_texts < 1:
            raise FairforgetError("--heldout-limit must be >= 0 and --perplexity-texts at least 1")
        if not self.pairs.is_file():
            raise FairforgetError(f"--pairs {self.pairs} not found (run scripts/10_preprocess_winogender.py)")
        if self.heldout_eval and self.crows is not None and not self.crows.is_file():
            raise FairforgetError(f"--crows {self.crows} not found (run scripts/00_fetch_data.py, or --crows none)")

    def resolved(self) -> "Config":
        """The config with preset values (and the start model) filled in where no flag was given."""
        preset = PRESETS[self.preset]
        filled = {name: preset[name] for name in preset if getattr(self, name) is None}
        return replace(self, model=self.model or START_MODELS[self.start], **filled)


def load_start_model(cfg: Config) -> Any:
    """The start model with exactly the parameters PCGU may change set trainable."""
    is_adapter = (Path(cfg.model) / "adapter_config.json").is_file()
    if cfg.scope == "lora" and not is_adapter:
        raise FairforgetError(f"--scope lora needs a peft adapter folder as --model, got {cfg.model}")
    loaded = load_model(cfg.model, cfg.device, merge_adapter=cfg.scope == "full")
    for name, param in loaded.model.named_parameters():
        param.requires_grad_(cfg.scope == "full" or "lora_" in name)
    return loaded


def selection_examples(cfg: Config) -> list:
    """The gender examples of the selection half (``--selection-metric gender``) or all of it, each as a seeded
    ``--selection-limit`` sample when given."""
    half = select_half(load_stereoset(cfg.stereoset), "selection", cfg.half_seed)
    if cfg.selection_metric == "gender":
        half = [e for e in half if e.bias_type == "gender"]
    return stratified_limit(half, cfg.selection_limit, cfg.sample_seed)


def selection_scores(model: Any, tokenizer: Any, examples: list, cfg: Config) -> dict[str, float]:
    metrics, _ = evaluate_stereoset(model, tokenizer, examples, cfg.eval_batch_size, cfg.n_boot, cfg.sample_seed)
    overall, gender = metrics["overall"]["all"], metrics["overall"].get("gender", {})
    return {"ss": overall["ss"], "ss_ci": overall["ss_ci"], "lms": overall["lms"], "icat": overall["icat"],
            "ss_gender": gender.get("ss", float("nan")), "ss_gender_ci": gender.get("ss_ci")}


def heldout_examples(cfg: Config) -> tuple[list, set[str], set[str]]:
    """Every held-out gender example plus a ``--heldout-limit`` sample of the held-out half: (union, gender ids,
    sample ids)."""
    half = select_half(load_stereoset(cfg.stereoset), "heldout", cfg.half_seed)
    gender = [e for e in half if e.bias_type == "gender"] if cfg.heldout_gender else []
    sample = stratified_limit(half, cfg.heldout_limit, cfg.sample_seed) if cfg.heldout_limit else []
    union = {e.id: e for e in gender + sample}
    return list(union.values()), {e.id for e in gender}, {e.id for e in sample}


def heldout_scores(model: Any, tokenizer: Any, cfg: Config, examples: list, texts: list[str],
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


def start_scores(model: Any, tokenizer: Any, cfg: Config, examples: list, texts: list[str]) -> dict[str, Any]:
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


def heldout_report(before: dict, after: dict, gender_ids: set[str], sample_ids: set[str], cfg: Config) -> dict:
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


def eval_steps(n_pairs: int, cfg: Config) -> set[int]:
    """Global step numbers after which the model is evaluated (evenly spread, always at each epoch's end)."""
    per_epoch = math.ceil(n_pairs / cfg.batch_size)
    marks = {max(1, round(per_epoch * (i + 1) / cfg.evals_per_epoch)) for i in range(cfg.evals_per_epoch)}
    return {epoch * per_epoch + m for epoch in range(cfg.epochs) for m in marks}


def main(cfg: Config) -> None:
    cfg = cfg.resolved()
    log_dir = cfg.log_dir or Path("outputs/pcgu") / cfg.out.name
    ckpt_dir = cfg.out.parent / f"{cfg.out.name}_checkpoints"
    read = read_pairs_tsv(cfg.pairs)
    pairs = balance_pairs(read, cfg.balance, cfg.seed)
    examples = selection_examples(cfg)
    loaded = load_start_model(cfg)
    model, tokenizer = loaded.model, loaded.tokenizer
    tensors = partition_tensors(model, cfg.aggregation)
    total = sum(t.n_partitions for t in tensors)
    k = max(1, round(cfg.fraction * total)) if cfg.fraction is not None else cfg.k
    adv, dis = encode_pairs(tokenizer, pairs, cfg.target_tokens)
    pad = tokenizer.pad_token_id
    module_types = sorted({t.module_type for t in tensors})
    layers = sorted({t.layer for t in tensors}, key=lambda x: (x == "none", int(x) if x.isdigit() else 0))
    retain = None
    if cfg.retain != "none":
        retain = RetainTerm(cfg.retain, model, tokenizer, load_neutral_texts("retain"), cfg.retain_batch_size)
    print(f"PCGU on {loaded.name}: {len(pairs)} pairs {orientation_counts(pairs)}, {total:,} {cfg.aggregation} "
          f"partitions in {len(tensors)} tensors, k={k:,}, lr={cfg.lr}, {cfg.epochs} epochs, "
          f"direction={cfg.direction}, targets={cfg.target_tokens}, min_cos={cfg.min_cos}, retain={cfg.retain} "
          f"(weight {cfg.retain_weight}), scope={cfg.scope}; selection: {len(examples)} StereoSet examples "
          f"({cfg.selection_metric})", flush=True)

    held = None
    if cfg.heldout_eval:
        held_examples, gender_ids, sample_ids = heldout_examples(cfg)
        texts = load_neutral_texts("heldout", cfg.perplexity_texts)
        held = start_scores(model, tokenizer, cfg, held_examples, texts)
    if cfg.eval_only is not None:
        if held is None:
            raise FairforgetError("--eval-only needs --heldout-eval")
        kept = load_model(str(cfg.eval_only), cfg.device)
        after = heldout_scores(kept.model, kept.tokenizer, cfg, held_examples, texts, ("items", "crows", "completions"))
        report = {**heldout_report(held, after, gender_ids, sample_ids, cfg), "texts": texts_provenance(texts)}
        write_json(log_dir / "summary.json", {"eval_only": str(cfg.eval_only), "heldout": report,
                                              "provenance": provenance(cfg, [cfg.stereoset])})
        print(f"held-out report of {cfg.eval_only} -> {log_dir / 'summary.json'}")
        return

    def evaluate(epoch: int, step: int, seconds: float) -> dict:
        row = {"epoch": epoch, "step": step, **pair_gap(model, adv, dis, pad, cfg.eval_batch_size),
               **selection_scores(model, tokenizer, examples, cfg), "train_seconds": round(seconds, 1)}
        metric = row["ss"] if cfg.selection_metric == "overall" else row["ss_gender"]
        row["distance_from_50"] = abs(metric - 50)
        print(f"step {step} (epoch {epoch}): selection SS {row['ss']:.2f} [{row['ss_ci'][0]:.2f}, "
              f"{row['ss_ci'][1]:.2f}] LMS {row['lms']:.2f} gender SS {row['ss_gender']:.2f}; pair gap "
              f"{row['mean_gap']:+.4f}, adv preferred {100 * row['share_adv_preferred']:.1f}%", flush=True)
        return row

    # a killed run resumes from its last training state (replaying the seeded shuffles, skipping done steps)
    resume = Checkpointer(ckpt_dir / "resume", cfg.checkpoint_every, fingerprint=config_to_dict(cfg))
    saved = resume.resume([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    if retain is not None:
        retain.position = saved.get("retain_position", 0)
    epochs = saved.get("epochs") or [evaluate(0, 0, 0.0)]
    steps: list[dict] = saved.get("steps", [])
    best_step = saved.get("best_step")
    stopped = saved.get("stopped_at_parity")
    evals_at = eval_steps(len(pairs), cfg)
    per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    start = time.perf_counter() - (epochs[-1]["train_seconds"] if len(epochs) > 1 else 0.0)
    state = lambda: {"epochs": epochs, "steps": steps, "best_step": best_step,  # noqa: E731
                     "stopped_at_parity": stopped, "retain_position": retain.position if retain else 0}
    batches = [] if stopped else shuffled_batches(len(pairs), cfg.epochs, cfg.batch_size, cfg.seed, resume)
    bar = progress(total=cfg.epochs * per_epoch, desc="PCGU steps", unit="step")
    bar.update(len(steps))
    for epoch, step, idx in batches:
        t0 = time.perf_counter()
        result = pcgu_step(model, tensors, [adv[i] for i in idx], [dis[i] for i in idx], pad, k, cfg.lr,
                           cfg.direction, cfg.min_cos, retain, cfg.retain_weight)
        bad = nonfinite_parameters([t for t, n in zip(tensors, result.selected) if n] if retain is None else tensors)
        values = torch.tensor(result.f_adv + result.f_dis)
        if bad or not torch.isfinite(values).all():
            raise FairforgetError(f"non-finite {'weights in ' + ', '.join(bad[:3]) if bad else 'objective'} at "
                                  f"epoch {epoch}, step {step} (lower --lr); the best checkpoint so far is "
                                  f"{ckpt_dir / 'best' if best_step else cfg.model}")
        f_a, f_d = sum(result.f_adv) / len(idx), sum(result.f_dis) / len(idx)
        steps.append({"step": step, "epoch": epoch, "f_adv": f_a, "f_dis": f_d, "gap": f_a - f_d,
                      "lowered_adv": result.lowered.count("adv"), "n_candidates": result.n_candidates,
                      "selected": sum(result.selected), "min_cos": result.min_selected_cosine,
                      "max_cos": result.max_selected_cosine, "retain_loss": result.retain_loss,
                      "seconds": round(time.perf_counter() - t0, 3),
                      **{f"sel_{m}": result.by_module.get(m, 0) for m in module_types},
                      **{f"sel_layer_{layer}": result.by_layer.get(layer, 0) for layer in layers}})
        bar.set_postfix(gap=f"{f_a - f_d:+.3f}")
        bar.update(1)
        if step not in evals_at:
            resume.after_step(step, state)
            continue
        row = evaluate(epoch, step, time.perf_counter() - start)
        epochs.append(row)
        kept = next((e for e in epochs[1:-1] if e["step"] == best_step), None)
        if kept is None or row["distance_from_50"] < kept["distance_from_50"]:
            save_model(model, tokenizer, ckpt_dir / "best")
            best_step = step
        if cfg.stop_at_parity and row["share_adv_preferred"] <= 0.5:
            stopped = step
        write_csv(log_dir / "unlearning_log.csv", steps)
        write_csv(log_dir / "epochs.csv", epochs)
        resume.save(step, state())
        if stopped:
            break
    bar.close()

    best = next(e for e in epochs[1:] if e["step"] == best_step)
    with atomic_dir(cfg.out) as tmp:
        shutil.copytree(ckpt_dir / "best", tmp, dirs_exist_ok=True)
    summary = {"kept_step": best["step"], "kept_epoch": best["epoch"],
               "criterion": f"smallest |SS - 50| ({cfg.selection_metric}) on {len(examples)} selection-half "
                            f"StereoSet dev examples (half seed {cfg.half_seed}); report on the held-out half",
               "stopped_at_parity": stopped, "n_pairs_read": len(read), "n_pairs_trained": len(pairs),
               "pairs_read": orientation_counts(read), "pairs_trained": orientation_counts(pairs),
               "n_partitions": total, "k": k, "epochs": epochs,
               "selected_by_module_total": {m: sum(s[f"sel_{m}"] for s in steps) for m in module_types},
               "train_seconds": round(time.perf_counter() - start, 1)}
    if held is not None:
        t0 = time.perf_counter()
        kept = load_model(str(cfg.out), cfg.device)
        after = heldout_scores(kept.model, kept.tokenizer, cfg, held_examples, texts)
        write_jsonl(log_dir / "heldout_items.jsonl", after["items"])
        summary["heldout"] = heldout_report(held, after, gender_ids, sample_ids, cfg)
        summary["heldout"]["texts"] = texts_provenance(texts)
        summary["heldout_seconds"] = round(time.perf_counter() - t0, 1)
        g, o = summary["heldout"]["gender"], summary["heldout"].get("overall")
        print(f"held-out gender SS {g['before']['ss']:.2f} -> {g['after']['ss']:.2f} [{g['after']['ss_ci'][0]:.2f}, "
              f"{g['after']['ss_ci'][1]:.2f}] (n {g['after']['n']}, McNemar p {g['paired']['p_value']:.3g}); "
              + (f"overall SS {o['before']['ss']:.2f} -> {o['after']['ss']:.2f}, LMS {o['before']['lms']:.2f} -> "
                 f"{o['after']['lms']:.2f}; " if o else "")
              + f"perplexity {summary['heldout']['perplexity']['before']:.2f} -> "
              f"{summary['heldout']['perplexity']['after']:.2f}", flush=True)
    summary["provenance"] = provenance(cfg, [cfg.pairs, cfg.stereoset])
    write_json(log_dir / "summary.json", summary)
    _plot(steps, epochs, log_dir / "unlearning.png")
    resume.clear()
    shutil.rmtree(ckpt_dir / "best", ignore_errors=True)
    print(f"kept step {best['step']} (selection SS {best['ss']:.2f}, gender {best['ss_gender']:.2f}) -> {cfg.out}; "
          f"logs in {log_dir}")


def _plot(steps: list[dict], epochs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot([s["step"] for s in steps], [s["gap"] for s in steps], lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("batch mean f(adv) - f(dis)")
    right.errorbar([e["step"] for e in epochs], [e["ss"] for e in epochs],
                   yerr=[[e["ss"] - e["ss_ci"][0] for e in epochs], [e["ss_ci"][1] - e["ss"] for e in epochs]],
                   marker="o", capsize=3)
    right.axhline(50, color="grey", lw=0.5)
    right.set_xlabel("step")
    right.set_ylabel("selection-half SS (95% CI)")
    save_figure(fig, path)


if __name__ == "__main__":
    run_script(main, Config())
