"""Stage 33: Self-Debias (Schick et al. 2021) settings as a method folder, checked on the selection half.

    python scripts/33_self_debias.py --model embedded:smollm2-135m-instruct [--bias-types gender race-color]

Self-Debias changes no weight: it rescales the next-token distribution at scoring time (``fairforget.methods
.self_debias``). This stage writes ``self_debias.json`` (base model, debiasing prefixes, decay constant,
epsilon) to --out as ``method_config.json``, which ``fairforget.methods.registry.load_output`` (the loader of
every evaluation stage and of stage 30) turns into the wrapped model. It also scores a seeded sample of the StereoSet *selection* half with and without the wrapper, so
the record holds the wrapper's cost (wall time and peak memory of scoring, the method's only cost) and a
first look at its effect; nothing is chosen on it. Writes ``method.json`` to --log-dir. With --settings-dir each
decay constant of --decays (and --decay-constant itself) is saved too, as ``<dir>/decay_<value>``: Self-Debias's
frontier, a settings file each (stage 30 scores every one).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.flags import SettingsFlags
from fairforget.methods.registry import load_output, save_method_config, write_method_record
from fairforget.methods.selection import save_setting, selection_examples, selection_score, setting_name
from fairforget.methods.self_debias import DEFAULT_DECAY, DEFAULT_EPSILON, PREFIXES, SelfDebiasConfig
from fairforget.models import DEFAULT_EMBEDDED, load_model

BiasType = Literal[tuple(PREFIXES)]  # type: ignore[valid-type]


@dataclass
class Config(SettingsFlags):
    model: str = DEFAULT_EMBEDDED
    bias_types: list[BiasType] = field(default_factory=lambda: ["gender"],
                                       metadata={"help": "debiasing prefixes used (one forward pass each)"})
    decay_constant: float = DEFAULT_DECAY
    epsilon: float = DEFAULT_EPSILON
    decays: list[float] = field(default_factory=lambda: [10.0, 25.0, 100.0], metadata={
        "help": "with --settings-dir: the decay constants also saved (beside --decay-constant), the frontier"})
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
        if min([self.decay_constant, *self.decays]) < 0 or not 0 < self.epsilon <= 1:
            raise FairforgetError("--decay-constant and --decays must be >= 0 and --epsilon in (0, 1]")


def main(cfg: Config) -> None:
    settings = typed_config(SelfDebiasConfig, cfg)
    prefixes = [PREFIXES[b] for b in cfg.bias_types]
    save_method_config(cfg.out, "self_debias", settings, prefixes=prefixes)

    def save_decay(_: None, __: None, folder: Path, decay: float) -> None:  # a setting is its settings file
        save_method_config(folder, "self_debias", dataclasses.replace(settings, decay_constant=decay),
                           prefixes=prefixes)

    for decay in sorted({cfg.decay_constant, *cfg.decays}):
        save_setting(cfg, None, None, decay, setting_name("decay", decay), decay, save_decay)
    examples = selection_examples(cfg.stereoset, cfg.selection_metric, cfg.selection_limit, cfg.half_seed, cfg.seed)
    plain = load_model(cfg.model, cfg.device)
    before = selection_score(plain.model, plain.tokenizer, examples, cfg.eval_batch_size, seed=cfg.seed)
    del plain
    start = time.perf_counter()
    wrapped = load_output(str(cfg.out), cfg.device)
    after = selection_score(wrapped.model, wrapped.tokenizer, examples, cfg.eval_batch_size, seed=cfg.seed)
    record = write_method_record(cfg.log_dir, "self_debias", cfg, time.perf_counter() - start, [cfg.stereoset],
                                 model_folder=str(cfg.out), chosen_setting=setting_name("decay", cfg.decay_constant),
                                 cost="scoring the selection sample "
                                 "with the wrapper (there is no training)", selection_plain=before,
                                 selection_self_debias=after)
    print(f"Self-Debias ({', '.join(cfg.bias_types)}, decay {cfg.decay_constant:g}): selection SS "
          f"{before['ss']:.2f} -> {after['ss']:.2f}, LMS {before['lms']:.2f} -> {after['lms']:.2f} "
          f"({record['wall_seconds']:.0f} s) -> {cfg.out}")


if __name__ == "__main__":
    run_script(main, Config())
