"""Stage 31: two-sided counterfactual data augmentation (CDA), then the shared LoRA fine-tune.

    python scripts/31_cda.py --model embedded:smollm2-135m-instruct [--limit N]

The source text is the stereotype-consistent (advantaged) side of the pair data (``data/processed/pairs.tsv``,
stage 10): the text a plain fine-tune would teach the bias from, and the text task-vector negation (stage 32)
fine-tunes on. Each sentence is kept and joined by its gender-swapped counterfactual (WinoBias word lists,
``fairforget.methods.cda``); pairs are kept, in a seeded order, while they fit the token budget of the plain
fine-tune on the source sentences, so CDA reads no more tokens than that fine-tune, over the same epochs.
Fine-tuning is ``fairforget.methods.lora.finetune`` (stage 11's loop). Writes the adapter to --out and
``method.json`` (wall time, peak memory, token counts, provenance) and ``train_texts.txt`` to --log-dir. With
--settings-dir each epoch's adapter is saved too (``<dir>/epochs_<e>``, the state after e epochs of this run):
CDA's frontier along training, at no extra training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fairforget.artifacts import write_csv, write_text
from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.flags import LoRAFlags, SettingsFlags
from fairforget.methods.lora import add_lora, finetune, save_adapter, target_modules
from fairforget.methods.cda import CDAConfig, augment, within_token_budget, load_swaps, token_count
from fairforget.methods.registry import save_method_config, write_method_record
from fairforget.methods.selection import save_epoch_setting, setting_name
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.training import StepLog
from fairforget.winogender import read_pairs_tsv


@dataclass
class Config(SettingsFlags, LoRAFlags):
    model: str = DEFAULT_EMBEDDED
    pairs: Path = Path("data/processed/pairs.tsv")
    swap_lists: list[Path] = field(default_factory=lambda: [Path("data/winobias/generalized_swaps.txt"),
                                                            Path("data/winobias/extra_gendered_words.txt")])
    out: Path = output_field(Path("models/methods/cda"), "adapter")
    log_dir: Path = output_field(Path("outputs/methods/cda"), "method log")
    lr: float = 5e-5
    lora_dropout: float = 0.05
    limit: int = field(default=0, metadata={"help": "use the first N pairs only (0: all)"})

    def validate(self) -> None:
        if min(self.batch_size, self.lora_r) < 1 or self.epochs < 0 or not self.lr > 0 or self.limit < 0:
            raise FairforgetError("--batch-size, --lora-r must be >= 1, --epochs >= 0 (0: the start model), "
                                  "--lr > 0, --limit >= 0")
        if not self.pairs.is_file():
            raise FairforgetError(f"--pairs {self.pairs} not found (run scripts/10_preprocess_winogender.py)")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    pairs = read_pairs_tsv(cfg.pairs)[: cfg.limit or None]
    swaps = load_swaps(cfg.swap_lists)
    loaded = load_model(cfg.model, cfg.device)
    source = [p.advantaged for p in pairs]
    budget = token_count(source, loaded.tokenizer)
    texts = within_token_budget(augment(source, swaps), loaded.tokenizer, budget, cfg.seed)
    model = add_lora(loaded.model, target_modules(loaded.model), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                     cfg.seed)
    typed = typed_config(CDAConfig, cfg)
    steps_per_epoch = -(-len(texts) // cfg.batch_size)

    def after_epoch(log: StepLog) -> None:  # with --settings-dir each epoch's adapter: a frontier along training
        if log.step % steps_per_epoch == 0:
            save_epoch_setting(cfg, model, loaded.tokenizer, "cda", typed, log.epoch)

    history = finetune(model, loaded.tokenizer, texts, cfg.epochs, cfg.batch_size, cfg.lr, seed=cfg.seed,
                       on_step=after_epoch, desc="CDA fine-tune")
    save_adapter(model, loaded.tokenizer, cfg.out, cfg.model)
    save_method_config(cfg.out, "cda", typed)
    write_text(cfg.log_dir / "train_texts.txt", "\n".join(texts) + "\n")
    write_csv(cfg.log_dir / "loss.csv", [vars(h) for h in history])
    changed = sum(a != b for a, b in zip(texts[::2], texts[1::2]))
    record = write_method_record(
        cfg.log_dir, "cda", cfg, time.perf_counter() - start, [cfg.pairs, *cfg.swap_lists],
        model_folder=str(cfg.out), chosen_setting=setting_name("epochs", cfg.epochs), n_source_sentences=len(source),
        token_budget=budget,
        tokens_trained_per_epoch=token_count(texts, loaded.tokenizer), n_train_texts=len(texts),
        n_pairs_changed_by_swap=changed, steps=len(history), final_loss=history[-1].loss if history else None)
    print(f"CDA: {len(texts)} texts ({record['tokens_trained_per_epoch']} tokens/epoch, budget {budget}), "
          f"{len(history)} steps in {record['wall_seconds']:.0f} s, peak {record['peak_memory_mib']:.0f} MiB "
          f"-> {cfg.out}")


if __name__ == "__main__":
    run_script(main, Config())
