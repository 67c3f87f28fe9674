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
the training pairs (and, with ``--max-ppl-increase``, for perplexity on ``--selection-ppl-texts`` retain-half
neutral texts); the point with the smallest |SS - 50| within every method's budget (LMS at most
``--max-lms-drop`` below the start's, perplexity at most ``--max-ppl-increase`` percent above it; the start
itself a candidate, and kept when no point is in budget; ``none`` for both: the closest trained point) is kept
as ``--out`` (a loadable Hugging Face folder). ``--stop-at-parity`` ends training at the first point where at most half of the training pairs
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
point and every ``--checkpoint-every`` steps (``<out>_resume/``, the kept point in ``<out>_best/``): a killed run started again
resumes there and ends with the same model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.flags import SelectionFlags
from fairforget.methods.pcgu_heldout import HeldOutConfig, start_heldout, write_eval_only
from fairforget.methods.pcgu_run import PCGURunConfig, prepare, train, write_results
from fairforget.methods.registry import write_method_record
from fairforget.methods.selection import setting_name
from fairforget.models import DEFAULT_EMBEDDED
from fairforget.provenance import provenance

PRESETS = {
    "default": {"lr": 2e-5, "k": 10_000, "epochs": 5},
    "aggressive": {"lr": 2e-4, "k": 50_000, "epochs": 5},
}
START_MODELS = {"base": DEFAULT_EMBEDDED, "finetuned": "models/finetuned_lora"}


@dataclass
class Config(SelectionFlags):
    """Stage 12's flags; the checkpoint choice takes every method's selection budget (:class:`SelectionFlags`)."""

    model: str | None = field(default=None, metadata={"help": "start model (adapter folders are merged); default "
                                                              "from --start"})
    start: Literal["base", "finetuned"] = field(
        default="finetuned", metadata={"help": "base: the pretrained model; finetuned: models/finetuned_lora"})
    pairs: Path = Path("data/processed/pairs.tsv")
    out: Path = output_field(Path("models/debiased"), "model")
    log_dir: Path | None = output_field(None, "training log", "default <out>_log")
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
    n_boot: int = 200
    checkpoint_every: int = field(default=10, metadata={"help": "also save the training state every N steps "
                                                                "(besides each evaluation point) so a killed run "
                                                                "resumes (0: evaluation points only)"})
    sample_seed: int = field(default=0, metadata={"help": "evaluation samples and bootstrap, fixed across --seed so "
                                                          "seeds are compared on the same examples"})

    def validate(self) -> None:
        if self.batch_size < 1:
            raise FairforgetError("--batch-size must be at least 1")
        if self.checkpoint_every < 0:
            raise FairforgetError("--checkpoint-every must be >= 0")
        if self.lr is not None and not self.lr >= 0:
            raise FairforgetError("--lr must be >= 0 (0: the start model)")
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
        if self.eval_only is not None and not self.heldout_eval:
            raise FairforgetError("--eval-only needs --heldout-eval")
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


def main(cfg: Config) -> None:
    start = time.perf_counter()
    cfg = cfg.resolved()
    run = prepare(typed_config(PCGURunConfig, cfg))
    held_cfg = typed_config(HeldOutConfig, cfg)
    held = (start_heldout(run.loaded, held_cfg), held_cfg) if cfg.heldout_eval else None
    if cfg.eval_only is not None:
        write_eval_only(cfg.eval_only, *held, run.log_dir, provenance(cfg, [cfg.stereoset]))
        return
    done = train(run)
    write_results(run, done, held, provenance(cfg, [cfg.pairs, cfg.stereoset]))
    write_method_record(run.log_dir, "pcgu", cfg, time.perf_counter() - start, [cfg.pairs, cfg.stereoset],
                        model_folder=str(cfg.out), chosen_setting=setting_name("step", done.best_step))


if __name__ == "__main__":
    run_script(main, Config())
