"""Partitioned Contrastive Gradient Unlearning (PCGU) on WinoGender pairs, with checkpoint choice on StereoSet.

Starts from the fine-tuned adapter (merged) by default, or from any model. Every batch: two backward passes
give g_a, g_d; partitions (rows or columns of each weight, each 1-D tensor whole) are ranked by the cosine of
the two gradients and the k lowest get a plain SGD step (see ``fairforget.pcgu``). A checkpoint is written
after each epoch and scored on a seeded sample of the *selection* half of StereoSet dev; the checkpoint with
the smallest |SS - 50| is kept as ``--out`` (a loadable Hugging Face folder). Report results with
``scripts/13_evaluate_stereoset.py --half heldout`` (the other half), never with the selection half.

Presets (flags override them): ``default`` is the predecessor's learning rate 2e-5 with the PCGU paper's
k = 10,000, batch 16, 5 epochs; ``aggressive`` takes 10x the learning rate (2e-4) and 5x the partitions
(50,000) to show what a clearly visible change does to bias and language modelling.

Writes ``<log-dir>/unlearning_log.csv`` (per step: f(adv), f(dis), their gap, partitions selected per module
type and per layer), ``epochs.csv``, ``summary.json`` (with provenance) and ``unlearning.png``. The training
state is saved at each epoch's end and every ``--checkpoint-every`` steps (``<out>_checkpoints/resume/``): a
killed run started again resumes there and ends with the same model.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from fairforget.artifacts import atomic_dir, provenance, save_figure, write_csv, write_json
from fairforget.checkpoint import Checkpointer
from fairforget.config import config_to_dict, run_script
from fairforget.errors import FairforgetError
from fairforget.models import load_model
from fairforget.pcgu import encode_pairs, nonfinite_parameters, pair_gap, partition_tensors, pcgu_step
from fairforget.stereoset import evaluate_stereoset, load_stereoset, select_half, stratified_limit
from fairforget.winogender import read_pairs_tsv

PRESETS = {
    "default": {"lr": 2e-5, "k": 10_000, "epochs": 5},
    "aggressive": {"lr": 2e-4, "k": 50_000, "epochs": 5},
}


@dataclass
class Config:
    model: str = field(default="models/finetuned_lora", metadata={"help": "start model (adapter folders are merged)"})
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
    direction: Literal["advantaged", "disadvantaged", "dynamic"] = "advantaged"
    scope: Literal["full", "lora"] = field(default="full", metadata={"help": "lora: update only the adapter"})
    selection_limit: int | None = field(default=None, metadata={"help": "sample of the selection half (speed)"})
    selection_metric: Literal["overall", "gender"] = field(
        default="overall", metadata={"help": "SS used for the |SS - 50| checkpoint choice"})
    half_seed: int = 0
    eval_batch_size: int = 32
    n_boot: int = 200
    checkpoint_every: int = field(default=10, metadata={"help": "also save the training state every N steps "
                                                                "(besides each epoch's end) so a killed run "
                                                                "resumes (0: epoch ends only)"})
    seed: int = 0
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
        if not self.pairs.is_file():
            raise FairforgetError(f"--pairs {self.pairs} not found (run scripts/10_preprocess_winogender.py)")

    def resolved(self) -> "Config":
        """The config with preset values filled in where no flag was given."""
        preset = PRESETS[self.preset]
        return replace(self, **{name: preset[name] for name in preset if getattr(self, name) is None})


def load_start_model(cfg: Config) -> Any:
    """The start model with exactly the parameters PCGU may change set trainable."""
    is_adapter = (Path(cfg.model) / "adapter_config.json").is_file()
    if cfg.scope == "lora" and not is_adapter:
        raise FairforgetError(f"--scope lora needs a peft adapter folder as --model, got {cfg.model}")
    loaded = load_model(cfg.model, cfg.device, merge_adapter=cfg.scope == "full")
    for name, param in loaded.model.named_parameters():
        param.requires_grad_(cfg.scope == "full" or "lora_" in name)
    return loaded


def save_checkpoint(model: Any, tokenizer: Any, folder: Path) -> None:
    """A loadable Hugging Face folder (adapters merged into a copy first), written atomically."""
    to_save = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    with atomic_dir(folder) as tmp:
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def selection_scores(model: Any, tokenizer: Any, examples: list, cfg: Config) -> dict[str, float]:
    metrics, _ = evaluate_stereoset(model, tokenizer, examples, cfg.eval_batch_size, cfg.n_boot, cfg.seed)
    overall, gender = metrics["overall"]["all"], metrics["overall"].get("gender", {})
    return {"ss": overall["ss"], "ss_ci": overall["ss_ci"], "lms": overall["lms"], "icat": overall["icat"],
            "ss_gender": gender.get("ss", float("nan")), "ss_gender_ci": gender.get("ss_ci")}


def main(cfg: Config) -> None:
    cfg = cfg.resolved()
    log_dir = cfg.log_dir or Path("outputs/pcgu") / cfg.out.name
    ckpt_dir = cfg.out.parent / f"{cfg.out.name}_checkpoints"
    pairs = read_pairs_tsv(cfg.pairs)
    examples = stratified_limit(select_half(load_stereoset(cfg.stereoset), "selection", cfg.half_seed),
                                cfg.selection_limit, cfg.seed)
    loaded = load_start_model(cfg)
    model, tokenizer = loaded.model, loaded.tokenizer
    tensors = partition_tensors(model, cfg.aggregation)
    total = sum(t.n_partitions for t in tensors)
    k = max(1, round(cfg.fraction * total)) if cfg.fraction is not None else cfg.k
    adv, dis = encode_pairs(tokenizer, pairs)
    pad = tokenizer.pad_token_id
    module_types = sorted({t.module_type for t in tensors})
    layers = sorted({t.layer for t in tensors}, key=lambda x: (x == "none", int(x) if x.isdigit() else 0))
    print(f"PCGU on {loaded.name}: {len(pairs)} pairs, {total:,} {cfg.aggregation} partitions in {len(tensors)} "
          f"tensors, k={k:,}, lr={cfg.lr}, {cfg.epochs} epochs, direction={cfg.direction}, scope={cfg.scope}; "
          f"selection: {len(examples)} StereoSet examples")

    def evaluate(epoch: int, seconds: float) -> dict:
        row = {"epoch": epoch, **pair_gap(model, adv, dis, pad, cfg.eval_batch_size),
               **selection_scores(model, tokenizer, examples, cfg), "train_seconds": round(seconds, 1)}
        metric = row["ss"] if cfg.selection_metric == "overall" else row["ss_gender"]
        row["distance_from_50"] = abs(metric - 50)
        print(f"epoch {epoch}: selection SS {row['ss']:.2f} [{row['ss_ci'][0]:.2f}, {row['ss_ci'][1]:.2f}] "
              f"LMS {row['lms']:.2f} gender SS {row['ss_gender']:.2f}; pair gap {row['mean_gap']:+.4f}, "
              f"adv preferred {100 * row['share_adv_preferred']:.1f}%", flush=True)
        return row

    # a killed run resumes from its last training state (replaying the seeded shuffles, skipping done steps)
    resume = Checkpointer(ckpt_dir / "resume", cfg.checkpoint_every, fingerprint=config_to_dict(cfg))
    saved = resume.resume([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    epochs = saved.get("epochs") or [evaluate(0, 0.0)]
    steps: list[dict] = saved.get("steps", [])
    rng = random.Random(cfg.seed)
    last_good = saved.get("last_good", cfg.model)
    step = 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for first in range(0, len(order), cfg.batch_size):
            step += 1
            if resume.done(step):
                continue
            idx = order[first: first + cfg.batch_size]
            t0 = time.perf_counter()
            result = pcgu_step(model, tensors, [adv[i] for i in idx], [dis[i] for i in idx], pad, k, cfg.lr,
                               cfg.direction)
            bad = nonfinite_parameters([t for t, n in zip(tensors, result.selected) if n])
            values = torch.tensor(result.f_adv + result.f_dis)
            if bad or not torch.isfinite(values).all():
                raise FairforgetError(f"non-finite {'weights in ' + ', '.join(bad[:3]) if bad else 'objective'} at "
                                      f"epoch {epoch}, step {step} (lower --lr); the last good checkpoint is "
                                      f"{last_good}")
            f_a, f_d = sum(result.f_adv) / len(idx), sum(result.f_dis) / len(idx)
            steps.append({"step": step, "epoch": epoch, "f_adv": f_a, "f_dis": f_d, "gap": f_a - f_d,
                          "lowered_adv": result.lowered.count("adv"), "n_candidates": result.n_candidates,
                          "selected": sum(result.selected), "min_cos": result.min_selected_cosine,
                          "max_cos": result.max_selected_cosine, "seconds": round(time.perf_counter() - t0, 3),
                          **{f"sel_{m}": result.by_module.get(m, 0) for m in module_types},
                          **{f"sel_layer_{layer}": result.by_layer.get(layer, 0) for layer in layers}})
            resume.after_step(step, lambda: {"epochs": epochs, "steps": steps, "last_good": last_good})
        if len(epochs) > epoch:  # finished and evaluated before the resume
            continue
        save_checkpoint(model, tokenizer, ckpt_dir / f"epoch-{epoch}")
        last_good = str(ckpt_dir / f"epoch-{epoch}")
        epochs.append(evaluate(epoch, time.perf_counter() - start))
        write_csv(log_dir / "unlearning_log.csv", steps)
        write_csv(log_dir / "epochs.csv", epochs)
        resume.save(step, {"epochs": epochs, "steps": steps, "last_good": last_good})

    best = min(epochs[1:], key=lambda e: e["distance_from_50"])
    with atomic_dir(cfg.out) as tmp:
        shutil.copytree(ckpt_dir / f"epoch-{best['epoch']}", tmp, dirs_exist_ok=True)
    summary = {"kept_epoch": best["epoch"], "criterion": f"smallest |SS - 50| ({cfg.selection_metric}) on "
               f"{len(examples)} selection-half StereoSet dev examples (half seed {cfg.half_seed}); report on the "
               f"held-out half", "n_partitions": total, "k": k, "epochs": epochs,
               "selected_by_module_total": {m: sum(s[f"sel_{m}"] for s in steps) for m in module_types},
               "train_seconds": round(time.perf_counter() - start, 1),
               "provenance": provenance(cfg, [cfg.pairs, cfg.stereoset])}
    write_json(log_dir / "summary.json", summary)
    _plot(steps, epochs, log_dir / "unlearning.png")
    resume.clear()
    print(f"kept epoch {best['epoch']} (selection SS {best['ss']:.2f}) -> {cfg.out}; logs in {log_dir}")


def _plot(steps: list[dict], epochs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot([s["step"] for s in steps], [s["gap"] for s in steps], lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("batch mean f(adv) - f(dis)")
    right.errorbar([e["epoch"] for e in epochs], [e["ss"] for e in epochs],
                   yerr=[[e["ss"] - e["ss_ci"][0] for e in epochs], [e["ss_ci"][1] - e["ss"] for e in epochs]],
                   marker="o", capsize=3)
    right.axhline(50, color="grey", lw=0.5)
    right.set_xlabel("epoch")
    right.set_ylabel("selection-half SS (95% CI)")
    save_figure(fig, path)


if __name__ == "__main__":
    run_script(main, Config())
