"""Stage 14: the same prompts completed by the base, fine-tuned and debiased models, side by side.

    python scripts/14_compare_prompts.py [--prompts FILE] [--models base=embedded:smollm2-135m-instruct ...]

Each prompt is completed greedily and by seeded sampling (plain text, no chat template). Writes
``completions.csv``, ``completions.md`` (a table per prompt) and ``summary.json`` (male/female word counts per
model and mode, provenance) to ``--out``. Completions are qualitative: they illustrate, they do not measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.artifacts import write_csv, write_json, write_text
from fairforget.provenance import provenance
from fairforget.config import output_field, run_script
from fairforget.errors import FairforgetError
from fairforget.evals.generation import comparison_markdown, complete, load_prompts, pronoun_counts
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.progress import set_quiet


@dataclass
class Config:
    models: list[str] = field(
        default_factory=lambda: [f"base={DEFAULT_EMBEDDED}", "finetuned=models/finetuned_lora",
                                 "debiased=models/debiased"],
        metadata={"help": "NAME=SPEC entries (hub id, folder, adapter folder, embedded:name)"})
    prompts: Path | None = field(default=None, metadata={"help": "one prompt a line (default: built-in list)"})
    modes: list[Literal["greedy", "sample"]] = field(default_factory=lambda: ["greedy", "sample"])
    max_new_tokens: int = 30
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    out: Path = output_field(Path("outputs/prompts"), "prompts")

    def validate(self) -> None:
        if not self.models:
            raise FairforgetError("--models needs at least one NAME=SPEC")
        for entry in self.models:
            if "=" not in entry or not entry.split("=", 1)[0]:
                raise FairforgetError(f"--models entry {entry!r} is not NAME=SPEC")
        if self.max_new_tokens < 1:
            raise FairforgetError("--max-new-tokens must be at least 1")


def main(cfg: Config) -> None:
    set_quiet(cfg.quiet)
    prompts = load_prompts(cfg.prompts)
    specs = dict(entry.split("=", 1) for entry in cfg.models)
    rows, counts = [], {}
    for name, spec in specs.items():
        loaded = load_model(spec, cfg.device)
        for mode in cfg.modes:
            texts = complete(loaded.model, loaded.tokenizer, prompts, mode, cfg.max_new_tokens, cfg.seed,
                             cfg.temperature, cfg.top_p)
            rows += [{"prompt": p, "mode": mode, "model": name, "spec": spec, "completion": t}
                     for p, t in zip(prompts, texts)]
            counts[f"{name}/{mode}"] = pronoun_counts(texts)
        print(f"{name}: " + ", ".join(f"{m}: {counts[f'{name}/{m}']}" for m in cfg.modes), flush=True)
    order = {name: i for i, name in enumerate(specs)}
    rows.sort(key=lambda r: (prompts.index(r["prompt"]), r["mode"], order[r["model"]]))
    write_csv(cfg.out / "completions.csv", rows)
    write_text(cfg.out / "completions.md", comparison_markdown(rows, list(specs)))
    write_json(cfg.out / "summary.json", {"word_counts": counts, "n_prompts": len(prompts),
                                          "provenance": provenance(cfg, [cfg.prompts] if cfg.prompts else [])})
    print(f"{len(rows)} completions -> {cfg.out}")


if __name__ == "__main__":
    run_script(main, Config())
