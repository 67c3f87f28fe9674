"""Stage 36: projection methods (SentenceDebias, INLP, LEACE) folded into the LM head, the strength chosen on the
StereoSet selection half.

    python scripts/36_projection.py --method leace --model embedded:smollm2-135m-instruct [--strengths 0.5 1]

1. Final hidden states (after the last norm) of gender-swapped sentence pairs from WinoBias dev and WinoGender
   (never StereoSet or CrowS-Pairs), at every position from the pair's first differing token
   (``fairforget.methods.projection``).
2. The method is fitted once, up to the largest strength: SentenceDebias k (directions removed), INLP iterations,
   LEACE alpha (blend with the identity). Defaults: ``projection.DEFAULT_STRENGTHS``.
3. For strength 0 and each --strengths value, the projection is folded into the (untied) head, W' = W P, and
   scored on a seeded sample of the StereoSet *selection* half; the strength with the smallest |SS - 50| whose
   LMS is at most --max-lms-drop below strength 0's and whose retain-half perplexity is at most
   --max-ppl-increase percent above it is kept, strength 0 if none is (``fairforget.methods.selection``).
4. The kept model is saved to --out (an ordinary Hugging Face folder; its config records the projection and the
   untying); ``strengths.csv`` and ``method.json`` (wall time, peak memory, fitting data and counts, the choice,
   provenance) go to --log-dir. Report with the held-out half only.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fairforget.artifacts import save_model, write_csv
from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.flags import SelectionFlags
from fairforget.methods.registry import CONFIG_FILE, method_config, write_method_record
from fairforget.methods.projection import (ProjectionConfig, DEFAULT_STRENGTHS, STRENGTH_NAMES, extract, fit, fitting_files, fitting_pairs,
                                           fold, record_in_config, untie_head)
from fairforget.methods.selection import (budget_text, choose_setting, criterion, save_setting, selection_examples,
                                          selection_score, selection_texts, setting_name)
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.progress import progress
from fairforget.scoring import reused_body_outputs
from fairforget.stats import proportional_sample


@dataclass
class Config(SelectionFlags):
    method: Literal["sentence_debias", "inlp", "leace"] = "sentence_debias"
    model: str = DEFAULT_EMBEDDED
    strengths: list[float] = field(default_factory=list, metadata={
        "help": "k (sentence_debias), iterations (inlp) or alpha in (0, 1] (leace); none: the method's defaults"})
    winobias_dir: Path | None = field(default=Path("data/winobias/data"), metadata={
        "help": "WinoBias folder whose dev pro/anti sentences are fitting pairs (none: leave out)"})
    winogender_dir: Path | None = field(default=Path("data/winogender/data"), metadata={
        "help": "WinoGender folder whose male/female sentences are fitting pairs (none: leave out)"})
    fit_limit: int | None = field(default=None, metadata={"help": "a seeded sample of this many fitting pairs"})
    out: Path = output_field(Path("models/methods/projection"), "model")
    log_dir: Path = output_field(Path("outputs/methods/projection"), "method log")
    inlp_l2: float = field(default=1e-3, metadata={"help": "L2 penalty of each INLP logistic probe"})
    batch_size: int = 32

    def validate(self) -> None:
        values = self.strengths or DEFAULT_STRENGTHS[self.method]
        if self.method == "leace" and any(not 0 <= s <= 1 for s in values):
            raise FairforgetError("--strengths: LEACE alpha values must lie in [0, 1] (0: the start model)")
        if self.method != "leace" and any(s < 0 or s != int(s) for s in values):
            raise FairforgetError(f"--strengths: {STRENGTH_NAMES[self.method]} must be whole numbers >= 0 "
                                  "(0: the start model)")
        if self.winobias_dir is None and self.winogender_dir is None:
            raise FairforgetError("--winobias-dir and --winogender-dir are both none: no fitting data")
        for flag, folder in (("--winobias-dir", self.winobias_dir), ("--winogender-dir", self.winogender_dir)):
            if folder is not None and not folder.is_dir():
                raise FairforgetError(f"{flag} {folder} is not a folder (run scripts/00_fetch_data.py)")
        if self.fit_limit is not None and self.fit_limit < 1:
            raise FairforgetError("--fit-limit must be at least 1 (or none: every pair)")
        if not 0 < self.inlp_l2:
            raise FairforgetError("--inlp-l2 must be positive")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    strengths = cfg.strengths or DEFAULT_STRENGTHS[cfg.method]
    pairs = fitting_pairs(cfg.winobias_dir, cfg.winogender_dir)
    sources = list(dict.fromkeys(p.source for p in pairs))
    pairs = proportional_sample([[p for p in pairs if p.source == s] for s in sources], cfg.fit_limit, cfg.seed)
    examples = selection_examples(cfg.stereoset, cfg.selection_metric, cfg.selection_limit, cfg.half_seed, cfg.seed)
    budget_texts = selection_texts(cfg.selection_ppl_texts) if cfg.max_ppl_increase is not None else []
    loaded = load_model(cfg.model, cfg.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    reps = extract(model, tokenizer, pairs, cfg.batch_size)
    projection_at = fit(cfg.method, reps, max(strengths), cfg.inlp_l2)
    start_weight, tied = untie_head(model)
    name = STRENGTH_NAMES[cfg.method]
    typed = typed_config(ProjectionConfig, cfg)

    def save_folded(folded: Any, tok: Any, folder: Path, strength: float) -> None:  # the head carries ``strength``
        record_in_config(folded, cfg.method, strength, tied, strength_name=name)
        save_model(folded, tok, folder, {CONFIG_FILE: method_config(cfg.method, typed, chosen_strength=strength)})

    rows = []
    with reused_body_outputs(model):
        for strength in progress([0.0, *strengths], desc=f"{name} on the selection half", unit=name):
            fold(model, start_weight, projection_at(strength))
            rows.append({"strength": strength, **selection_score(model, tokenizer, examples, cfg.eval_batch_size,
                                                                 seed=cfg.seed, texts=budget_texts)})
            save_setting(cfg, model, tokenizer, strength, setting_name(name, strength), strength, save_folded)
            print(f"{name} {strength:g}: selection {budget_text(rows[-1])}", flush=True)
    best = choose_setting(rows, "strength", cfg)
    fold(model, start_weight, projection_at(best["strength"]))
    fitting = {"pairs": dict(Counter(p.source for p in pairs)), "sentences": 2 * len(pairs),
               "token_rows": len(reps.labels), "male_rows": int(reps.labels.sum()),
               "positions": "every token from the first one where the pair's sentences differ"}
    save_folded(model, tokenizer, cfg.out, best["strength"])
    write_csv(cfg.log_dir / "strengths.csv", [{**r, "ss_ci": list(r["ss_ci"])} for r in rows])
    record = write_method_record(
        cfg.log_dir, cfg.method, cfg, time.perf_counter() - start, [*fitting_files(cfg.winobias_dir, cfg.winogender_dir), cfg.stereoset],
        model_folder=str(cfg.out), strength_name=name, chosen_strength=best["strength"],
        chosen_setting=setting_name(name, best["strength"]), selection=rows,
        fitting_data=fitting, untied_lm_head=tied, representation="final hidden state after the last norm",
        criterion=criterion(cfg, len(examples), f"{name}=0"))
    print(f"{cfg.method}: {name} {best['strength']:g} kept ({record['wall_seconds']:.0f} s, peak "
          f"{record['peak_memory_mib']:.0f} MiB) -> {cfg.out}")


if __name__ == "__main__":
    run_script(main, Config())
