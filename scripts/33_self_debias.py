"""Stage 33: Self-Debias (Schick et al. 2021) settings as a method folder, checked on the selection half.

    python scripts/33_self_debias.py --model embedded:smollm2-135m-instruct [--bias-types gender race-color]

Self-Debias changes no weight: it rescales the next-token distribution at scoring time (``fairforget.methods
.self_debias``). This stage writes ``self_debias.json`` (base model, debiasing prefixes, decay constant,
epsilon) to --out as ``method_config.json``, which ``fairforget.methods.registry.load_output`` (the loader of
every evaluation stage and of stage 30) turns into the wrapped model. It also scores a seeded sample of the StereoSet *selection* half with and without the wrapper, so
the record holds the wrapper's cost (wall time and peak memory of scoring, the method's only cost) and a
first look at its effect; nothing is chosen on it. Writes ``method.json`` to --log-dir.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.flags import RunFlags
from fairforget.methods.registry import load_output, save_method_config, write_method_record
from fairforget.methods.selection import selection_examples, selection_score
from fairforget.methods.self_debias import DEFAULT_DECAY, DEFAULT_EPSILON, PREFIXES, SelfDebiasConfig
from fairforget.models import DEFAULT_EMBEDDED, load_model

BiasType = Literal[tuple(PREFIXES)]  # type: ignore[valid-type]


@dataclass
class Config(RunFlags):
    model: str = DEFAULT_EMBEDDED
    bias_types: list[BiasType] = field(default_factory=lambda: ["gender"],
                                       metadata={"help": "debiasing prefixes used (one forward pass each)"})
    decay_constant: float = DEFAULT_DECAY
    epsilon: float = DEFAULT_EPSILON
    stereoset: Path = Path("data/stereoset/dev.json")
    selection_metric: Literal["overall", "gender"] = "gender"
    selection_limit: int | None = 120
    half_seed: int = 0
    eval_batch_size: int = 8
    out: Path = output_field(Path("models/methods/self_debias"), "self-debias settings")
    log_dir: Path = output_field(Path("outputs/methods/self_debias"), "method log")

    def validate(self) -> None:
        if not self.bias_types:
            raise FairforgetError("--bias-types needs at least one bias type")
        if self.decay_constant < 0 or not 0 < self.epsilon <= 1:
            raise FairforgetError("--decay-constant must be >= 0 and --epsilon in (0, 1]")


def main(cfg: Config) -> None:
    settings = typed_config(SelfDebiasConfig, cfg)
    save_method_config(cfg.out, "self_debias", settings, prefixes=[PREFIXES[b] for b in cfg.bias_types])
    examples = selection_examples(cfg.stereoset, cfg.selection_metric, cfg.selection_limit, cfg.half_seed, cfg.seed)
    plain = load_model(cfg.model, cfg.device)
    before = selection_score(plain.model, plain.tokenizer, examples, cfg.eval_batch_size, seed=cfg.seed)
    del plain
    start = time.perf_counter()
    wrapped = load_output(str(cfg.out), cfg.device)
    after = selection_score(wrapped.model, wrapped.tokenizer, examples, cfg.eval_batch_size, seed=cfg.seed)
    record = write_method_record(cfg.log_dir, "self_debias", cfg, time.perf_counter() - start, [cfg.stereoset],
                                 model_folder=str(cfg.out), cost="scoring the selection sample "
                                 "with the wrapper (there is no training)", selection_plain=before,
                                 selection_self_debias=after)
    print(f"Self-Debias ({', '.join(cfg.bias_types)}, decay {cfg.decay_constant:g}): selection SS "
          f"{before['ss']:.2f} -> {after['ss']:.2f}, LMS {before['lms']:.2f} -> {after['lms']:.2f} "
          f"({record['wall_seconds']:.0f} s) -> {cfg.out}")


if __name__ == "__main__":
    run_script(main, Config())
