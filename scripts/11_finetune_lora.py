"""LoRA fine-tuning on the WinoGender sentences (the model PCGU then starts from).

Targets are chosen per architecture (``fairforget.methods.lora.TARGET_MODULES``, overridable with
``--target-modules``). The adapter is saved with peft ``save_pretrained`` to ``--out`` (atomically), naming
``--model`` as its base, so ``fairforget.models.load_model(out)`` rebuilds the fine-tuned model. A loss log
(CSV and PNG) and a summary with the loss before and after on the training sentences are written beside it.
The training state is saved every ``--checkpoint-every`` steps to ``<out>_resume/``: a killed run started
again resumes there and ends with the same adapter. Under ``torchrun`` / ``accelerate launch`` it trains
data-parallel (``fairforget.distributed``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from fairforget import distributed
from fairforget.artifacts import write_csv, write_json
from fairforget.provenance import provenance
from fairforget.checkpoint import Checkpointer
from fairforget.config import config_to_dict, output_field, run_script
from fairforget.errors import FairforgetError
from fairforget.methods.lora import add_lora, finetune, kernel_bypass_warning, mean_loss, save_adapter, target_modules
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.plots import new_figure, save_figure
from fairforget.progress import set_quiet
from fairforget.run_folders import beside
from fairforget.winogender import load_winogender_sentences


@dataclass
class Config:
    model: str = field(default=DEFAULT_EMBEDDED, metadata={"help": "base model: hub id, folder or embedded:name"})
    sentences: Path = Path("data/winogender/data/all_sentences.tsv")
    out: Path = output_field(Path("models/finetuned_lora"), "adapter")
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-5
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list, metadata={"help": "override the per-architecture targets"})
    log_every: int = field(default=10, metadata={"help": "print progress every N steps"})
    limit: int = field(default=0, metadata={"help": "train on the first N sentences only (0: all)"})
    checkpoint_every: int = field(default=20, metadata={"help": "save the training state every N steps to "
                                                                "<out>_resume/ so a killed run resumes (0: off)"})
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "lora_r", "log_every"):
            if getattr(self, name) < 1:
                raise FairforgetError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise FairforgetError("--lr must be positive")
        if self.limit < 0 or self.checkpoint_every < 0:
            raise FairforgetError("--limit and --checkpoint-every must be >= 0")


def main(cfg: Config) -> None:
    set_quiet(cfg.quiet)
    distributed.init(cfg.device)  # data-parallel under torchrun / accelerate launch; nothing otherwise
    texts = load_winogender_sentences(cfg.sentences)
    if cfg.limit:
        texts = texts[: cfg.limit]
    loaded = load_model(cfg.model, cfg.device)
    targets = target_modules(loaded.model, cfg.target_modules)
    model = add_lora(loaded.model, targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.seed)
    warning = kernel_bypass_warning(model, targets)
    if warning:
        print(f"warning: {warning}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loss_before = mean_loss(model, loaded.tokenizer, texts)
    start = time.perf_counter()
    checkpoint = Checkpointer(beside(cfg.out, "resume"), cfg.checkpoint_every,
                              fingerprint=config_to_dict(cfg))
    total_steps = -(-len(texts) // cfg.batch_size) * cfg.epochs

    def report(entry) -> None:
        if entry.step % cfg.log_every == 0 or entry.step == total_steps:
            print(f"epoch {entry.epoch} step {entry.step}/{total_steps}: loss {entry.loss:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    history = finetune(model, loaded.tokenizer, texts, cfg.epochs, cfg.batch_size, cfg.lr, seed=cfg.seed,
                       on_step=report, checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    loss_after = mean_loss(model, loaded.tokenizer, texts)
    save_adapter(model, loaded.tokenizer, cfg.out, cfg.model)
    checkpoint.clear()
    log_dir = beside(cfg.out, "log")
    write_csv(log_dir / "loss.csv", [asdict(h) for h in history])
    _plot(history, log_dir / "loss.png")
    summary = {"targets": targets, "trainable_parameters": trainable, "n_sentences": len(texts),
               "steps": len(history), "train_seconds": round(seconds, 1),
               "loss_before": loss_before, "loss_after": loss_after, "warning": warning,
               "provenance": provenance(cfg, [cfg.sentences])}
    write_json(log_dir / "summary.json", summary)
    print(f"trained {trainable:,} LoRA parameters on {targets} for {len(history)} steps in {seconds:.0f} s; "
          f"mean NLL on the training sentences {loss_before:.4f} -> {loss_after:.4f}; adapter in {cfg.out}")


def _plot(history, path: Path) -> None:
    fig, ax = new_figure(figsize=(6, 3.5))
    ax.plot([h.step for h in history], [h.loss for h in history], lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("mean NLL per token")
    ax.set_title("LoRA fine-tuning loss")
    save_figure(fig, path)


if __name__ == "__main__":
    run_script(main, Config())
