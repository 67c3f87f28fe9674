"""Stage 12's PCGU run: the start model, the selection-half evaluation points, the resumable training loop and
the kept model with its logs (the algorithm itself is :mod:`fairforget.methods.pcgu`)."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fairforget.artifacts import atomic_dir, save_model, write_csv, write_json
from fairforget.checkpoint import Checkpointer
from fairforget.config import config_to_dict, typed_config
from fairforget.errors import FairforgetError
from fairforget.layout import CONFIGS
from fairforget.evals.perplexity import load_neutral_texts
from fairforget.evals.stereoset import evaluate_stereoset
from fairforget.methods.pcgu import (RetainTerm, encode_pairs, nonfinite_parameters, pair_gap, partition_tensors,
                                     pcgu_step)
from fairforget.methods.pcgu_heldout import HeldOutConfig, Start, model_heldout
from fairforget.methods.registry import CONFIG_FILE, Knob, MethodSpec, method_config, register_method
from fairforget.methods.selection import (budget_perplexity, budget_text, choose_setting, criterion, has_budget,
                                          save_setting, selection_examples, selection_texts, setting_name)
from fairforget.models import load_model
from fairforget.pairs import balance_pairs, orientation_counts
from fairforget.plots import new_figure, save_figure
from fairforget.progress import progress
from fairforget.run_folders import beside
from fairforget.training import shuffled_batches
from fairforget.winogender import read_pairs_tsv


@dataclass(frozen=True)
class PCGUConfig:
    """PCGU's settings (stage 12 after ``resolved()``), saved next to the kept model."""

    model: str | None
    lr: float
    k: int | None
    fraction: float | None
    epochs: int
    batch_size: int
    aggregation: str
    direction: str
    target_tokens: str
    min_cos: float | None
    balance: str
    retain: str
    retain_weight: float
    scope: str
    evals_per_epoch: int
    selection_limit: int | None
    selection_metric: str
    max_lms_drop: float | None
    max_ppl_increase: float | None
    selection_ppl_texts: int
    half_seed: int
    seed: int


@dataclass(frozen=True)
class PCGURunConfig(PCGUConfig):
    """Stage 12's run: PCGU's settings, its data and folders, and how its evaluation points are scored."""

    pairs: Path
    stereoset: Path
    out: Path
    log_dir: Path | None  # None: <out>_log
    retain_batch_size: int
    stop_at_parity: bool
    settings_dir: Path | None  # every evaluation point's model as <dir>/step_<N> (a frontier along training)
    checkpoint_every: int
    eval_batch_size: int
    n_boot: int
    sample_seed: int
    device: str


def load_start_model(cfg: PCGURunConfig) -> Any:
    """The start model with exactly the parameters PCGU may change set trainable."""
    is_adapter = (Path(cfg.model) / "adapter_config.json").is_file()
    if cfg.scope == "lora" and not is_adapter:
        raise FairforgetError(f"--scope lora needs a peft adapter folder as --model, got {cfg.model}")
    loaded = load_model(cfg.model, cfg.device, merge_adapter=cfg.scope == "full")
    for name, param in loaded.model.named_parameters():
        param.requires_grad_(cfg.scope == "full" or "lora_" in name)
    return loaded


def selection_scores(model: Any, tokenizer: Any, examples: list, budget_texts: list[str],
                     cfg: PCGURunConfig) -> dict[str, float]:
    """Selection-half SS (with its interval), LMS, ICAT and gender SS of the model, and its perplexity on the
    budget texts when there are any."""
    metrics, _ = evaluate_stereoset(model, tokenizer, examples, cfg.eval_batch_size, cfg.n_boot, cfg.sample_seed)
    overall, gender = metrics["overall"]["all"], metrics["overall"].get("gender", {})
    return {"ss": overall["ss"], "ss_ci": overall["ss_ci"], "lms": overall["lms"], "icat": overall["icat"],
            "ss_gender": gender.get("ss", float("nan")), "ss_gender_ci": gender.get("ss_ci"),
            **budget_perplexity(model, tokenizer, budget_texts, cfg.n_boot, cfg.sample_seed)}


def eval_steps(n_pairs: int, cfg: PCGURunConfig) -> set[int]:
    """Global step numbers after which the model is evaluated (evenly spread, always at each epoch's end)."""
    per_epoch = math.ceil(n_pairs / cfg.batch_size)
    marks = {max(1, round(per_epoch * (i + 1) / cfg.evals_per_epoch)) for i in range(cfg.evals_per_epoch)}
    return {epoch * per_epoch + m for epoch in range(cfg.epochs) for m in marks}


@dataclass
class Setup:
    """What a run trains: pairs, start model, partitions, encodings, retain term, selection examples and
    perplexity-budget texts, folders."""

    cfg: PCGURunConfig
    read: list
    pairs: list
    examples: list
    loaded: Any
    tensors: list
    total: int
    k: int
    adv: list
    dis: list
    module_types: list[str]
    layers: list[str]
    retain: RetainTerm | None
    budget_texts: list[str]  # retain-half neutral texts of the perplexity bound (none without it)
    log_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_dir = self.cfg.log_dir or beside(self.cfg.out, "log")

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


@dataclass
class Trained:
    """A finished training loop: per-step and per-evaluation rows, the kept step and the loop's timing."""

    steps: list[dict]
    epochs: list[dict]
    best_step: int | None
    stopped: int | None
    start: float
    resume: Checkpointer


def prepare(cfg: PCGURunConfig) -> Setup:
    """Load pairs, selection examples (and perplexity-budget texts) and start model, partition its weights, and
    print what will run."""
    read = read_pairs_tsv(cfg.pairs)
    pairs = balance_pairs(read, cfg.balance, cfg.seed)
    examples = selection_examples(cfg.stereoset, cfg.selection_metric, cfg.selection_limit, cfg.half_seed,
                                  cfg.sample_seed)
    budget_texts = selection_texts(cfg.selection_ppl_texts) if cfg.max_ppl_increase is not None else []
    loaded = load_start_model(cfg)
    model, tokenizer = loaded.model, loaded.tokenizer
    tensors = partition_tensors(model, cfg.aggregation)
    total = sum(t.n_partitions for t in tensors)
    k = max(1, round(cfg.fraction * total)) if cfg.fraction is not None else cfg.k
    adv, dis = encode_pairs(tokenizer, pairs, cfg.target_tokens)
    module_types = sorted({t.module_type for t in tensors})
    layers = sorted({t.layer for t in tensors}, key=lambda x: (x == "none", int(x) if x.isdigit() else 0))
    retain = None
    if cfg.retain != "none":
        retain = RetainTerm(cfg.retain, model, tokenizer, load_neutral_texts("retain"), cfg.retain_batch_size)
    print(f"PCGU on {loaded.name}: {len(pairs)} pairs {orientation_counts(pairs)}, {total:,} {cfg.aggregation} "
          f"partitions in {len(tensors)} tensors, k={k:,}, lr={cfg.lr}, {cfg.epochs} epochs, "
          f"direction={cfg.direction}, targets={cfg.target_tokens}, min_cos={cfg.min_cos}, retain={cfg.retain} "
          f"(weight {cfg.retain_weight}), scope={cfg.scope}; selection: {len(examples)} StereoSet examples "
          f"({cfg.selection_metric})" + (f", perplexity on {len(budget_texts)} retain-half texts" if budget_texts
                                          else ""), flush=True)
    return Setup(cfg, read, pairs, examples, loaded, tensors, total, k, adv, dis, module_types, layers, retain,
                 budget_texts)


def evaluate(run: Setup, epoch: int, step: int, seconds: float) -> dict:
    """One evaluation point: the training-pair gap and the selection-half scores (perplexity-budget texts
    included), printed."""
    cfg = run.cfg
    row = {"epoch": epoch, "step": step,
           **pair_gap(run.model, run.adv, run.dis, run.tokenizer.pad_token_id, cfg.eval_batch_size),
           **selection_scores(run.model, run.tokenizer, run.examples, run.budget_texts, cfg),
           "train_seconds": round(seconds, 1)}
    metric = row["ss"] if cfg.selection_metric == "overall" else row["ss_gender"]
    row["distance_from_50"] = abs(metric - 50)
    print(f"step {step} (epoch {epoch}): selection {budget_text(row)}, SS interval [{row['ss_ci'][0]:.2f}, "
          f"{row['ss_ci'][1]:.2f}], gender SS {row['ss_gender']:.2f}; pair gap "
          f"{row['mean_gap']:+.4f}, adv preferred {100 * row['share_adv_preferred']:.1f}%", flush=True)
    return row


def train(run: Setup) -> Trained:
    """The PCGU steps with their evaluation points, keeping the best one in ``<out>_best``; a killed
    run resumes from its last training state (replaying the seeded shuffles, skipping done steps)."""
    cfg, model, tensors, adv, dis, retain = run.cfg, run.model, run.tensors, run.adv, run.dis, run.retain
    pad = run.tokenizer.pad_token_id
    resume = Checkpointer(beside(cfg.out, "resume"), cfg.checkpoint_every, fingerprint=config_to_dict(cfg))
    saved = resume.resume([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    if retain is not None:
        retain.position = saved.get("retain_position", 0)
    epochs = saved.get("epochs") or [evaluate(run, 0, 0, 0.0)]
    steps: list[dict] = saved.get("steps", [])
    best_step = saved.get("best_step")
    if has_budget(cfg) and not saved:  # with a budget the start model is a candidate too
        save_model(model, run.tokenizer, beside(cfg.out, "best"))
        best_step = 0
    stopped = saved.get("stopped_at_parity")
    evals_at = eval_steps(len(run.pairs), cfg)
    per_epoch = math.ceil(len(run.pairs) / cfg.batch_size)
    start = time.perf_counter() - (epochs[-1]["train_seconds"] if len(epochs) > 1 else 0.0)
    state = lambda: {"epochs": epochs, "steps": steps, "best_step": best_step,  # noqa: E731
                     "stopped_at_parity": stopped, "retain_position": retain.position if retain else 0}
    batches = [] if stopped else shuffled_batches(len(run.pairs), cfg.epochs, cfg.batch_size, cfg.seed, resume)
    bar = progress(total=cfg.epochs * per_epoch, desc="PCGU steps", unit="step")
    bar.update(len(steps))
    for epoch, step, idx in batches:
        t0 = time.perf_counter()
        result = pcgu_step(model, tensors, [adv[i] for i in idx], [dis[i] for i in idx], pad, run.k, cfg.lr,
                           cfg.direction, cfg.min_cos, retain, cfg.retain_weight)
        bad = nonfinite_parameters([t for t, n in zip(tensors, result.selected) if n] if retain is None else tensors)
        values = torch.tensor(result.f_adv + result.f_dis)
        if bad or not torch.isfinite(values).all():
            raise FairforgetError(f"non-finite {'weights in ' + ', '.join(bad[:3]) if bad else 'objective'} at "
                                  f"epoch {epoch}, step {step} (lower --lr); the best checkpoint so far is "
                                  f"{beside(cfg.out, 'best') if best_step else cfg.model}")
        f_a, f_d = sum(result.f_adv) / len(idx), sum(result.f_dis) / len(idx)
        steps.append({"step": step, "epoch": epoch, "f_adv": f_a, "f_dis": f_d, "gap": f_a - f_d,
                      "lowered_adv": result.lowered.count("adv"), "n_candidates": result.n_candidates,
                      "selected": sum(result.selected), "min_cos": result.min_selected_cosine,
                      "max_cos": result.max_selected_cosine, "retain_loss": result.retain_loss,
                      "seconds": round(time.perf_counter() - t0, 3),
                      **{f"sel_{m}": result.by_module.get(m, 0) for m in run.module_types},
                      **{f"sel_layer_{layer}": result.by_layer.get(layer, 0) for layer in run.layers}})
        bar.set_postfix(gap=f"{f_a - f_d:+.3f}")
        bar.update(1)
        if step not in evals_at:
            resume.after_step(step, state)
            continue
        row = evaluate(run, epoch, step, time.perf_counter() - start)
        epochs.append(row)
        save_setting(cfg, model, run.tokenizer, step, setting_name("step", step),
                     {CONFIG_FILE: method_config("pcgu", typed_config(PCGUConfig, cfg), kept_step=step)})
        if choose_setting(epochs, "step", cfg) is row:
            save_model(model, run.tokenizer, beside(cfg.out, "best"))
            best_step = step
        if cfg.stop_at_parity and row["share_adv_preferred"] <= 0.5:
            stopped = step
        write_csv(run.log_dir / "unlearning_log.csv", steps)
        write_csv(run.log_dir / "epochs.csv", epochs)
        resume.save(step, state())
        if stopped:
            break
    bar.close()
    return Trained(steps, epochs, best_step, stopped, start, resume)


def write_results(run: Setup, done: Trained, held: tuple[Start, HeldOutConfig] | None,
                  provenance_block: dict) -> None:
    """Copy the kept checkpoint to ``--out``, add the held-out report (``held``: the start's scores and the
    report's settings), write ``summary.json`` (with ``provenance_block``) and the figure, and clear the
    training state."""
    cfg, steps, epochs = run.cfg, done.steps, done.epochs
    best = next(e for e in epochs if e["step"] == done.best_step)
    with atomic_dir(cfg.out, "model") as tmp:
        shutil.copytree(beside(cfg.out, "best"), tmp, dirs_exist_ok=True)
        write_json(tmp / CONFIG_FILE, method_config("pcgu", typed_config(PCGUConfig, cfg), kept_step=best["step"]))
    summary = {"kept_step": best["step"], "kept_epoch": best["epoch"],
               "criterion": f"{criterion(cfg, len(run.examples), 'the start')}, half seed {cfg.half_seed}; report "
                            f"on the held-out half",
               "stopped_at_parity": done.stopped, "n_pairs_read": len(run.read), "n_pairs_trained": len(run.pairs),
               "pairs_read": orientation_counts(run.read), "pairs_trained": orientation_counts(run.pairs),
               "n_partitions": run.total, "k": run.k, "epochs": epochs,
               "selected_by_module_total": {m: sum(s[f"sel_{m}"] for s in steps) for m in run.module_types},
               "train_seconds": round(time.perf_counter() - done.start, 1)}
    if held is not None:
        t0 = time.perf_counter()
        summary["heldout"] = model_heldout(cfg.out, *held, run.log_dir)
        summary["heldout_seconds"] = round(time.perf_counter() - t0, 1)
    summary["provenance"] = provenance_block
    write_json(run.log_dir / "summary.json", summary)
    plot(steps, epochs, run.log_dir / "unlearning.png")
    done.resume.clear()
    shutil.rmtree(beside(cfg.out, "best"), ignore_errors=True)
    print(f"kept step {best['step']} (selection SS {best['ss']:.2f}, gender {best['ss_gender']:.2f}) -> {cfg.out}; "
          f"logs in {run.log_dir}")


def plot(steps: list[dict], epochs: list[dict], path: Path) -> None:
    """``unlearning.png``: the batch pair gap per step and the selection-half SS per evaluation point."""
    fig, (left, right) = new_figure(1, 2, figsize=(10, 3.5))
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



PCGU_PRESET_CONFIG = CONFIGS / "pcgu" / "gf_after_dyn_bal_lr1e-3.json"  # the ablation's choice (README)

register_method(MethodSpec(
    name="pcgu", title="PCGU (Yu et al. 2023), causal-LM port", script="12_pcgu_unlearn.py", config=PCGUConfig,
    knobs=(Knob("lr", "SGD step on the selected partitions"), Knob("epochs", "checkpoints along training")),
    zero_flags={"lr": 0.0}, saves_settings=True,
    inputs=lambda layout: [layout.group_first_pairs, layout.stereoset, PCGU_PRESET_CONFIG],
    data_flags=lambda layout: {"config": PCGU_PRESET_CONFIG, "pairs": layout.group_first_pairs,
                               "stereoset": layout.stereoset, "heldout_eval": False}))
