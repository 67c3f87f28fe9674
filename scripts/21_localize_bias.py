"""Stage 21: where a model processes BBQ prompts, layer by layer and head by head.

    python scripts/21_localize_bias.py --model embedded:smollm2-135m-instruct --per-category 10
    python scripts/21_localize_bias.py --model models/recovered/smollm2-135m-instruct --stage after

For a stratified sample of BBQ prompts per category (the evaluation prompts, same option order), captures the
residual stream and MLP output of every layer, and every head's output and attention map (eager attention),
reduced on the fly to per-layer / per-head statistics (norms, attention entropy, attention mass on the
context and question tokens at the answer position; see fairforget.evals.localization), averaged per group: all,
each category, and each category x context condition. Writes to outputs/localization/<model>/<stage>/:
arrays.npz, per_group.csv, summary.json (per-group curves, top heads, provenance), items.jsonl,
heads_all.png, layers_by_category.png, and for --stage after, difference_heads.png against before/.
--mode (answer by default: SmolLM2 is at chance in letter mode) scores the same prompts with stage 20's
scorer and also groups them by the model's answer type (answer|biased, answer|counter_biased,
answer|unknown, and per context condition), so head statistics can be compared between biased and other answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.provenance import provenance
from fairforget.evals.bbq import load_bbq, sample_per_category
from fairforget.evals.bbq_eval import evaluate_bbq, use_chat_template
from fairforget.config import output_field, run_script
from fairforget.errors import FairforgetError
from fairforget.evals.localization import run_localization
from fairforget.models import DEFAULT_EMBEDDED, load_model, model_name
from fairforget.progress import set_quiet


@dataclass
class Config:
    model: str = DEFAULT_EMBEDDED
    data_dir: Path = Path("data/bbq")
    categories: list[str] = field(default_factory=list, metadata={"help": "BBQ categories (default: all)"})
    per_category: int = field(default=10, metadata={"help": "prompts per category (stratified by condition, polarity)"})
    stage: Literal["before", "after"] = "before"
    mode: Literal["letter", "answer", "none"] = field(
        default="answer", metadata={"help": "scorer whose answers group the prompts by answer type (none: skip)"})
    name: str | None = field(default=None, metadata={"help": "folder name of the model (default: from --model)"})
    out_root: Path = output_field(Path("outputs/localization"), "localization")
    chat_template: Literal["auto", "on", "off"] = "auto"
    batch_size: int = 8
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    dtype: str = "auto"

    def validate(self) -> None:
        if self.per_category < 1:
            raise FairforgetError(f"--per-category must be at least 1, got {self.per_category}")
        if self.batch_size < 1:
            raise FairforgetError(f"--batch-size must be at least 1, got {self.batch_size}")


def main(cfg: Config) -> None:
    set_quiet(cfg.quiet)
    data = load_bbq(cfg.data_dir, cfg.categories or None)
    examples = sample_per_category(data.examples, cfg.per_category, cfg.seed)
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    chat = use_chat_template(loaded.tokenizer, cfg.chat_template)
    root = cfg.out_root / (cfg.name or model_name(cfg.model))
    out = root / cfg.stage
    print(f"localizing {len(examples)} BBQ prompts with {loaded.source} -> {out}")
    start = time.time()
    answer_types = None
    if cfg.mode != "none":
        _, items = evaluate_bbq(loaded.model, loaded.tokenizer, examples, cfg.mode, cfg.chat_template, cfg.batch_size,
                                n_boot=1, seed=cfg.seed)
        answer_types = {(it["category"], it["example_id"]): it["answer_type"] for it in items}
    summary = run_localization(
        loaded.model, loaded.tokenizer, examples, out, f"{loaded.name} ({cfg.stage})",
        loaded.tokenizer if chat else None, cfg.seed, cfg.batch_size,
        provenance(cfg, data.files, model_source=loaded.source, chat_template=chat, device=str(loaded.device)),
        compare_to=root / "before" if cfg.stage == "after" else None, answer_types=answer_types)
    print(f"done in {time.time() - start:.0f} s ({summary['wall_seconds']} s in forward passes)")


if __name__ == "__main__":
    run_script(main, Config())
