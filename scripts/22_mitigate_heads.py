"""Stage 22: prune attention heads chosen by a bias signal, with the controls that attribute the effect to them.

    python scripts/22_mitigate_heads.py --signal stereoset --select top-k --k 20 [--select fdr --q 0.1]

BBQ scenarios are split by --split-seed into mitigation and held-out sides (fairforget.evals.bbq_split). A per-head
signal (``stereoset``: contribution to the stereotype-vs-anti log-odds on StereoSet's selection half;
``bbq``: correlation with context influence on the mitigation side; fairforget.methods.head_pruning) chooses
the heads (top k or Benjamini-Hochberg at q, signed or by magnitude), each scaled by 1 - --strength. On the
same held-out items (the held-out suite, fairforget.evals.suite: BBQ held-out scenarios, StereoSet held-out half,
CrowS-Pairs, perplexity texts; rows and tables in fairforget.methods.head_controls): before / pruned / random heads (same strengths, --random-draws draws) /
recovered (pruned, then fine-tuned on mitigation items of both conditions; trainable set in
fairforget.methods.recovery) / recovery only (same data, steps, seed, no pruning), paired against before; chosen
minus random; a dose-response over --dose-ks; localization of held-out prompts before and after.
A killed recovery resumes from <models-dir>/recovered/<model>_resume/.

Writes to --out (default outputs/mitigation/<model>/): split.json, head_signal.csv, head_signal.png, one
stage-20 run folder per variant (before/, pruned/, random_<d>/, recovered/, recovery_only/), controls.md,
controls.csv, dose_response.csv/.png, recovery_log.csv, metrics.json; models <models-dir>/pruned|recovered/<model>/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.evals.bbq import CATEGORIES, load_bbq, sample_per_category
from fairforget.evals.bbq_eval import use_chat_template
from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.methods import head_experiment as he
from fairforget.methods import head_pruning as hp
from fairforget.methods.head_controls import EVALS
from fairforget.methods.registry import write_method_record
from fairforget.models import DEFAULT_EMBEDDED, load_model, model_name
from fairforget.provenance import provenance

Category = Literal[CATEGORIES]  # type: ignore[valid-type]


@dataclass
class Config:
    model: str = DEFAULT_EMBEDDED
    data_dir: Path = Path("data/bbq")
    categories: list[Category] = field(default_factory=list, metadata={"help": "BBQ categories (default: all 11)"})
    mitigation_fraction: float = field(default=0.5, metadata={"help": "share of scenarios used for mitigation"})
    split_seed: int = field(default=0, metadata={"help": "seed of the scenario split and of both sides' samples"})
    mitigation_per_category: int = 40
    eval_per_category: int = 40
    mode: Literal["letter", "answer"] = field(default="answer", metadata={"help": "BBQ scoring (answer: SmolLM2 "
                                                                                  "is at chance in letter mode)"})
    permutations: Literal["none", "cyclic"] = field(default="none", metadata={"help": "letter mode: average "
                                                                                      "over the 3 cyclic orders"})
    chat_template: Literal["auto", "on", "off"] = "auto"
    signal: hp.Signal = field(default="stereoset", metadata={"help": "per-head signal that chooses the heads"})
    signal_domain: Literal["gender", "overall"] = "gender"
    signal_limit: int | None = field(default=None, metadata={"help": "StereoSet selection-half examples (all)"})
    activity: Literal["delta", "norm"] = field(default="delta", metadata={"help": "bbq signal: head scalar"})
    select: hp.Select = "top-k"
    k: int = field(default=20, metadata={"help": "heads pruned with --select top-k"})
    q: float = field(default=0.1, metadata={"help": "false discovery rate with --select fdr"})
    signed: bool = field(default=True, metadata={"help": "rank by the signed score (--no-signed: by |score|)"})
    strength: float = field(default=1.0, metadata={"help": "each chosen head is scaled by 1 - strength"})
    random_draws: int = field(default=5, metadata={"help": "random-heads control draws (same strengths)"})
    dose_ks: list[int] = field(default_factory=lambda: [5, 10, 20, 40], metadata={"help": "dose-response k"})
    dose_random_draws: int = 3
    protect_top: int = field(default=0, metadata={"help": "keep the N chosen heads whose pruning costs most"})
    protect_examples: int = field(default=64, metadata={"help": "stratified mitigation examples for the cost"})
    recovery: Literal["lora", "full", "none"] = "lora"
    recovery_epochs: int = 2
    recovery_lr: float | None = field(default=None, metadata={"help": "default: head_pruning.DEFAULT_LR"})
    recovery_batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=list, metadata={"help": "default: recovery.SAFE_TARGETS"})
    evals: list[str] = field(default_factory=lambda: ["bbq", "stereoset", "crows", "perplexity"])
    stereoset_path: Path = Path("data/stereoset/dev.json")
    stereoset_limit: int | None = field(default=300, metadata={"help": "held-out overall sample (+ all gender)"})
    stereoset_gender_limit: int | None = field(default=None, metadata={"help": "held-out gender examples (all)"})
    half_seed: int = field(default=0, metadata={"help": "StereoSet selection / held-out halves"})
    crows_path: Path = Path("data/crows_pairs/data/crows_pairs_anonymized.csv")
    crows_limit: int | None = 300
    perplexity_texts: int = 50
    batch_size: int = 16
    n_boot: int = 1000
    localize_per_category: int = field(default=10, metadata={"help": "held-out prompts localized (0: skip)"})
    localize_batch_size: int = 8
    localization_root: Path = Path("outputs/localization")
    models_dir: Path = Path("models")
    settings_dir: Path | None = field(default=None, metadata={
        "help": "also save the pruned model (no recovery) at every --dose-ks k as <dir>/k_<k>: stage 30 --frontiers"})
    checkpoint_every: int = field(default=20, metadata={"help": "recovery state saved every N steps (0: off)"})
    out: Path | None = output_field(None, "mitigation", "run folder (default outputs/mitigation/<model>)")
    seed: int = field(default=0, metadata={"help": "option order, bootstrap, random heads and training seed"})
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        for name in ("mitigation_per_category", "eval_per_category", "batch_size", "n_boot", "recovery_epochs",
                     "recovery_batch_size", "lora_r", "localize_batch_size", "random_draws", "protect_examples", "k"):
            if getattr(self, name) < 1:
                raise FairforgetError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if min(self.checkpoint_every, self.protect_top, self.localize_per_category, self.dose_random_draws) < 0:
            raise FairforgetError("--checkpoint-every, --protect-top, --localize-per-category, --dose-random-draws "
                                  "must be >= 0")
        if self.recovery_lr is not None and self.recovery_lr <= 0:
            raise FairforgetError(f"--recovery-lr must be positive, got {self.recovery_lr}")
        if sorted(set(self.evals) - set(EVALS)) or "bbq" not in self.evals:
            raise FairforgetError(f"--evals must include bbq and name only {', '.join(EVALS)} (got {self.evals})")
        if self.permutations == "cyclic" and self.mode != "letter":
            raise FairforgetError("--permutations cyclic needs --mode letter")
        if not 0 < self.q < 1 or not 0 <= self.strength <= 1 or any(k < 1 for k in self.dose_ks):
            raise FairforgetError("--q must lie in (0, 1), --strength in [0, 1] (0: the start model), every "
                                  "--dose-ks value >= 1")


def main(cfg: Config) -> None:
    start = time.time()
    data = load_bbq(cfg.data_dir, cfg.categories or None)
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    name = model_name(cfg.model)
    chat = use_chat_template(loaded.tokenizer, cfg.chat_template)
    run_cfg = typed_config(hp.HeadRunConfig, cfg)
    files = list(data.files) + [p for p, e in ((cfg.stereoset_path, "stereoset"), (cfg.crows_path, "crows"))
                                if e in cfg.evals]
    run = he.prepare(run_cfg, data, loaded, chat, cfg.out or Path("outputs/mitigation") / name, provenance(cfg, files))
    choice = he.choose_heads(run, run_cfg)
    scores = he.evaluate_controls(run, run_cfg, choice)
    localized = sample_per_category(run.held_out, cfg.localize_per_category or None, cfg.seed)
    if cfg.localize_per_category:
        he.localize(run, run_cfg, loaded.model, localized, run.out / "localization_before", "before",
                    scores["before"]["bbq"][1], None)
    dose = he.dose_response(run, run_cfg, choice, scores)
    history, final_model = he.recover(run, run_cfg, choice, scores) if cfg.recovery != "none" else ({}, loaded.model)
    if cfg.localize_per_category:
        final = "recovered" if "recovered" in scores else "pruned"
        he.localize(run, run_cfg, final_model, localized, cfg.localization_root / name / "after", final,
                    scores[final]["bbq"][1], run.out / "localization_before")
    he.write_summary(run, run_cfg, choice, scores, dose, history, time.time() - start)
    write_method_record(run.out, "head_pruning", cfg, time.time() - start, list(data.files),
                        model_folder=str(he.final_model_folder(cfg.models_dir, vars(cfg))))


if __name__ == "__main__":
    run_script(main, Config())
