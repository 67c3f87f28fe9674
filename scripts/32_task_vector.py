"""Stage 32: task-vector negation (Ilharco et al. 2023; Dige et al. 2024), lambda chosen on the StereoSet
selection half.

    python scripts/32_task_vector.py --model embedded:smollm2-135m-instruct [--lambdas 0.5 1 2]

1. LoRA fine-tune theta_0 (``fairforget.methods.lora.finetune``) on the stereotype-consistent (advantaged) side of the
   pair data, merged: theta_ft; tau = theta_ft - theta_0 (``fairforget.methods.task_vector``). With
   ``--source neutral`` (the registered ``damage_reference``) the fine-tune reads retain-half neutral texts instead,
   as many as fit the advantaged side's token budget (``cda.within_token_budget``): a task vector that targets nothing.
2. For each lambda in --lambdas: theta_0 - lambda * tau scored on a seeded sample of the StereoSet *selection*
   half (gender examples with --selection-metric gender); the lambda with the smallest |SS - 50| whose LMS is
   at most --max-lms-drop below lambda = 0's and whose retain-half perplexity is at most --max-ppl-increase
   percent above it is kept, lambda 0 if none is (``fairforget.methods.selection``).
3. The kept model is saved to --out (a Hugging Face folder); ``lambdas.csv``, ``train_texts.json`` and
   ``method.json`` (wall time, peak memory, tau norm, tokens trained on, the choice, provenance) go to --log-dir. Report with the held-out half only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.artifacts import save_model, write_csv, write_json
from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.flags import LoRAFlags, SelectionFlags
from fairforget.evals.perplexity import load_neutral_texts, texts_provenance
from fairforget.methods.cda import token_count, within_token_budget
from fairforget.methods.lora import add_lora, finetune, target_modules
from fairforget.methods.selection import (budget_text, choose_setting, criterion, save_setting, selection_examples,
                                          selection_score, selection_texts, setting_name)
from fairforget.methods.registry import CONFIG_FILE, method_config, write_method_record
from fairforget.methods.task_vector import (SOURCE_METHODS, TaskVectorConfig, apply_negation, state_copy, task_vector,
                                            tau_norms)
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.progress import progress
from fairforget.winogender import read_pairs_tsv


@dataclass
class Config(SelectionFlags, LoRAFlags):
    model: str = DEFAULT_EMBEDDED
    pairs: Path = Path("data/processed/pairs.tsv")
    source: Literal["advantaged", "neutral"] = field(default="advantaged", metadata={
        "help": "fine-tune text: the pairs' advantaged side, or retain-half neutral text at the same token budget "
                "(the damage reference)"})
    out: Path = output_field(Path("models/methods/task_vector"), "model")
    log_dir: Path = output_field(Path("outputs/methods/task_vector"), "method log")
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate of the advantaged-side fine-tune"})
    lambdas: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    limit: int = field(default=0, metadata={"help": "use the first N pairs only (0: all)"})

    def validate(self) -> None:
        if min(self.epochs, self.batch_size, self.lora_r) < 1 or not self.lr > 0 or self.limit < 0:
            raise FairforgetError("--epochs, --batch-size, --lora-r must be >= 1, --lr > 0, --limit >= 0")
        if not self.lambdas or any(not lam >= 0 for lam in self.lambdas):
            raise FairforgetError("--lambdas needs one or more values >= 0 (0: the start model)")
        if not self.pairs.is_file():
            raise FairforgetError(f"--pairs {self.pairs} not found (run scripts/10_preprocess_winogender.py)")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    name = SOURCE_METHODS[cfg.source]
    texts = [p.advantaged for p in read_pairs_tsv(cfg.pairs)[: cfg.limit or None]]
    examples = selection_examples(cfg.stereoset, cfg.selection_metric, cfg.selection_limit, cfg.half_seed, cfg.seed)
    budget_texts = selection_texts(cfg.selection_ppl_texts) if cfg.max_ppl_increase is not None else []
    loaded = load_model(cfg.model, cfg.device)
    tokenizer = loaded.tokenizer
    budget = token_count(texts, tokenizer)
    if cfg.source == "neutral":
        neutral = load_neutral_texts("retain")
        texts = within_token_budget([(t,) for t in neutral], tokenizer, budget, cfg.seed)
        print(f"damage reference: {len(texts)} of {len(neutral)} retain-half neutral texts fit the advantaged "
              f"side's {budget} tokens", flush=True)
    theta_0 = state_copy(loaded.model)
    model = add_lora(loaded.model, target_modules(loaded.model), cfg.lora_r, cfg.lora_alpha, 0.0, cfg.seed)
    finetune(model, tokenizer, texts, cfg.epochs, cfg.batch_size, cfg.lr, seed=cfg.seed,
             desc=f"{cfg.source}-text fine-tune")
    model = model.merge_and_unload()
    model.eval()
    tau = task_vector(theta_0, state_copy(model))
    typed = typed_config(TaskVectorConfig, cfg)

    def info(lam: float) -> dict:  # beside a saved model: the method, its settings and the lambda it carries
        return {CONFIG_FILE: method_config(name, typed, chosen_lambda=lam)}

    rows = []
    for lam in progress([0.0, *cfg.lambdas], desc="lambda on the selection half", unit="lambda"):
        apply_negation(model, theta_0, tau, lam)
        rows.append({"lambda": lam, **selection_score(model, tokenizer, examples, cfg.eval_batch_size, seed=cfg.seed,
                                                      texts=budget_texts)})
        save_setting(cfg, model, tokenizer, lam, setting_name("lambda", lam), info(lam))
        print(f"lambda {lam:g}: selection {budget_text(rows[-1])}", flush=True)
    best = choose_setting(rows, "lambda", cfg)
    apply_negation(model, theta_0, tau, best["lambda"])
    save_model(model, tokenizer, cfg.out, info(best["lambda"]))
    write_csv(cfg.log_dir / "lambdas.csv", [{**r, "ss_ci": list(r["ss_ci"])} for r in rows])
    write_json(cfg.log_dir / "train_texts.json", texts)
    record = write_method_record(
        cfg.log_dir, name, cfg, time.perf_counter() - start, [cfg.pairs, cfg.stereoset],
        model_folder=str(cfg.out), chosen_lambda=best["lambda"], chosen_setting=setting_name("lambda", best["lambda"]),
        selection=rows, n_train_texts=len(texts),
        train_tokens=token_count(texts, tokenizer), token_budget=budget,
        neutral_texts=texts_provenance(texts) if cfg.source == "neutral" else None,
        criterion=criterion(cfg, len(examples), "lambda=0"), **tau_norms(tau))
    print(f"{name}: lambda {best['lambda']:g} kept ({record['wall_seconds']:.0f} s, peak "
          f"{record['peak_memory_mib']:.0f} MiB) -> {cfg.out}")


if __name__ == "__main__":
    run_script(main, Config())
