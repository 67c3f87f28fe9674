"""Stage 30: every debiasing method on the same held-out items, each paired against the same "before" model.

    python scripts/30_compare_methods.py [--methods cda=models/methods/cda ...] [--stereoset-limit N]

Per model (the "before" model first, then each ``name=folder`` of --methods, by default every method in
``fairforget.methods.registry``, loaded with its ``load_output``, so Self-Debias is its scoring wrapper):

* StereoSet (held-out half of dev, never the selection half a method chose on): overall SS and LMS on a
  seeded proportional sample of --stereoset-limit examples, gender SS on the gender examples of the
  held-out half (all, or a seeded --gender-limit sample; the proportional sample alone holds too few);
* CrowS-Pairs, gender and all bias types;
* BBQ in answer mode on the held-out scenarios of stage 22's split (``bbq_split.split_by_scenario``, the same
  --split-seed, so head pruning never saw them): s_DIS, s_AMB, accuracy on a per-category sample, and with
  --bbq-gender-limit, s_AMB of the held-out Gender_identity examples (BBQ gender, a measure of each frontier);
* perplexity on the neutral held-out texts (``fairforget.evals.perplexity``).

Each cell has its 95% interval (bootstrap). Paired tests of each method against "before" on the same items:
StereoSet change in gender |SS - 50| and overall SS (paired bootstrap, McNemar on the stereotype-preferred
decisions), CrowS-Pairs (McNemar, paired bootstrap), BBQ (paired bootstrap of each metric, McNemar on
correctness), perplexity (paired bootstrap of the relative change). Wall time and peak memory of each method
come from its ``method.json`` (--records). Scoring, caching (``<out>/scores/<weights digest>/``, reused when
the same weights were scored with the same settings, so an interrupted comparison resumes) and pairing are the
held-out suite's (``fairforget.evals.suite``), through the evaluation interface; the tables are in
``fairforget.study.compare``. Writes ``summary.csv``, ``summary.md``,
``paired.csv``, ``bias_vs_capability.png`` and ``metrics.json`` (with provenance) to --out.

Frontiers (``--frontiers name=folder``, the folder a method's stage saved every setting to with
``--settings-dir``): each setting is scored on the same items as ``name@<setting>`` and paired against "before";
``frontier.csv``, ``frontier_<measure>.png`` (one line per method, the damage reference dashed) and a section of
``summary.md`` with each point's distance from the damage curve (``fairforget.study.frontier``). The tables above
it hold the settings the stages chose on the selection half.

A method whose record says it kept strength 0 of --before (no setting in its budget) is the before model exactly
(the method contract, tested for every method), so it is paired with before's own scores rather than scored
again: a change of exactly 0.

Seeds: a method run again with another seed, named ``<method>:seed<N>`` in --methods, is grouped with
``<method>``: ``seeds.csv`` and a section of ``summary.md`` with the seed mean and spread of each paired change
beside every run's interval (``fairforget.study.seeds``). A method trained on another stage-10 pair source, named
``<method>+<source>``, is shown beside ``<method>`` on every bias measure (in-domain against transfer).

Positive controls (``--start MODEL``, the controls preset): "before" is a model with a planted bias and --start
the model it was planted into. The start model is scored on the same items too, and for every method the share
of the planted shift it removes, 100 * (planted - method) / (planted - start) (0%: nothing, 100%: back to the
start model, > 100%: overshoot), with a paired bootstrap interval over the same items
(``fairforget.methods.plant``), on StereoSet gender and overall micro SS, CrowS-Pairs gender and WinoBias,
beside its capability cost against the planted model (LMS change, perplexity change %): ``shares.csv``, a
section of ``summary.md`` and ``shares`` in ``metrics.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.artifacts import read_json, write_csv, write_json, write_text
from fairforget.provenance import provenance
from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.evals.perplexity import texts_provenance
from fairforget.evals.suite import SuiteConfig, held_out_items, levels, score_all, score_model
from fairforget.evals.winobias import data_files as winobias_files
from fairforget.study.compare import (markdown, paired_rows, pair_source_markdown, planted_shares, plot, share_rows,
                                     shares_markdown, summary_row)
from fairforget.study.frontier import (SEPARATOR, frontier_markdown, frontier_rows, kept_start, plot_frontiers,
                                      setting_folders)
from fairforget.study.seeds import seed_groups, seed_rows, seeds_markdown
from fairforget.methods.registry import METHODS, default_folders, load_output, output_kind
from fairforget.models import DEFAULT_EMBEDDED


@dataclass
class Config:
    before: str = field(default=DEFAULT_EMBEDDED, metadata={"help": "the model every method starts from"})
    start: str | None = field(default=None, metadata={"help": "positive control: the unplanted model --before was "
                                                               "planted into; also scored, for the share of the "
                                                               "planted shift each method removes"})
    methods: list[str] = field(default_factory=lambda: [
        f"{name}={folder}" for name, folder in default_folders(DEFAULT_EMBEDDED).items()],
        metadata={"help": "name=model folder (default: every registered method's folder)"})
    records: list[str] = field(default_factory=lambda: [f"{m}=outputs/methods/{m}/method.json" for m in METHODS],
                               metadata={"help": "name=method.json with wall_seconds and peak_memory_mib"})
    frontiers: list[str] = field(default_factory=list, metadata={
        "help": "name=folder of a method's saved settings (its stage's --settings-dir): each scored as name@setting"})
    stereoset: Path = Path("data/stereoset/dev.json")
    crows: Path = Path("data/crows_pairs/data/crows_pairs_anonymized.csv")
    winobias: Path = Path("data/winobias/data")
    bbq_dir: Path = Path("data/bbq")
    stereoset_limit: int | None = field(default=300, metadata={"help": "held-out StereoSet sample (None: all)"})
    gender_limit: int | None = field(default=None, metadata={"help": "seeded sample of the held-out gender "
                                                                      "examples for gender SS (None: every one)"})
    crows_limit: int | None = field(default=200, metadata={"help": "CrowS sample for 'all' (plus every gender pair)"})
    winobias_limit: int | None = field(default=None, metadata={"help": "WinoBias test pairs (None: all minimal)"})
    bbq_per_category: int | None = field(default=8, metadata={"help": "held-out BBQ examples per category"})
    bbq_gender_limit: int | None = field(default=0, metadata={
        "help": "held-out Gender_identity BBQ examples for BBQ gender s_AMB, besides (None: every one, 0: none)"})
    ppl_limit: int | None = field(default=50, metadata={"help": "neutral held-out texts for perplexity"})
    half_seed: int = 0
    split_seed: int = field(default=0, metadata={"help": "stage 22's scenario split seed (held-out BBQ side)"})
    mitigation_fraction: float = 0.5
    batch_size: int = 32
    wrapper_batch_size: int = field(default=4, metadata={"help": "scoring wrappers (Self-Debias) keep [batch, "
                                                                   "length, vocab] distributions: smaller batches"})
    n_boot: int = 1000
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: Path = output_field(Path("outputs/methods/comparison"), "method comparison")

    def validate(self) -> None:
        for entry in (*self.methods, *self.records, *self.frontiers):
            if "=" not in entry:
                raise FairforgetError(f"--methods, --records and --frontiers take name=path, got {entry!r}")
        names = [m.split("=", 1)[0] for m in self.methods]
        if {"before", "start"} & set(names) or len(set(names)) != len(names) or any(SEPARATOR in n for n in names):
            raise FairforgetError(f"--methods names must be unique, without {SEPARATOR!r}, and not 'before' or "
                                  f"'start': {names}")
        for entry in self.methods:
            name, spec = entry.split("=", 1)
            if not Path(spec).exists():
                raise FairforgetError(f"--methods {name}: {spec} not found (run its stage first)")
        for entry in self.frontiers:
            setting_folders(*entry.split("=", 1))  # each names a folder of saved settings
        if self.bbq_gender_limit is not None and self.bbq_gender_limit < 0:
            raise FairforgetError(f"--bbq-gender-limit must be at least 0, got {self.bbq_gender_limit}")
        if self.batch_size < 1 or self.wrapper_batch_size < 1 or self.n_boot < 1:
            raise FairforgetError("--batch-size, --wrapper-batch-size and --n-boot must be at least 1")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    suite = typed_config(SuiteConfig, cfg)
    items = held_out_items(suite)
    chosen_specs = {"before": cfg.before, **dict(m.split("=", 1) for m in cfg.methods)}
    settings = {n: str(f) for entry in cfg.frontiers for n, f in setting_folders(*entry.split("=", 1)).items()}
    specs = {**chosen_specs, **settings}
    record_files = dict(r.split("=", 1) for r in cfg.records)
    records = {name: read_json(record_files[name], f"{name} method record") if Path(record_files.get(name, "")).is_file()
               else {} for name in specs}
    unchanged = [n for n in chosen_specs if n != "before" and kept_start(records[n], cfg.before)]
    if unchanged:
        print(f"kept strength 0, the before model exactly (method contract), so scored as before: "
              f"{', '.join(unchanged)}", flush=True)
    print(f"comparing {len(chosen_specs) - 1} methods and {len(settings)} frontier settings on "
          f"{len(items.stereoset)} StereoSet, {len(items.crows)} CrowS-Pairs, {len(items.winobias)} WinoBias, "
          f"{len(items.bbq)} BBQ items ({len(items.bbq_sample)} for overall) and {len(items.neutral)} neutral texts", flush=True)
    scored_specs = {n: cfg.before if n in unchanged else spec for n, spec in specs.items()}
    results, changes = score_all(scored_specs, items, suite, cfg.out / "scores", load_output,
                                 lambda spec: output_kind(spec) == "wrapper")
    rows = [summary_row(name, results[name], changes.get(name), records[name]) for name in chosen_specs]
    chosen = {n: changes[n] for n in chosen_specs if n in changes}
    frontier = frontier_rows(changes, results)
    shares, start_levels, control = {}, None, ""
    if cfg.start is not None:
        reference = levels(score_model("start", cfg.start, items, suite, cfg.out / "scores", load_output,
                                       output_kind(cfg.start) == "wrapper"), items, suite)
        shares = planted_shares(reference, results["before"], {n: results[n] for n in chosen}, items, cfg.n_boot,
                                cfg.seed)
        write_csv(cfg.out / "shares.csv", share_rows(shares, results, chosen))
        control = shares_markdown(shares, results, chosen, cfg.start)
        start_levels = {k: reference[k] for k in ("stereoset", "crows", "winobias", "bbq", "perplexity", "source")}
    seconds = time.perf_counter() - start
    write_csv(cfg.out / "summary.csv", rows)
    replicates = seed_rows(chosen, seed_groups(chosen))
    if replicates:
        write_csv(cfg.out / "seeds.csv", replicates)
    chosen_settings = {n: records[n].get("chosen_setting") for n in chosen_specs}
    curves = seeds_markdown(replicates) + pair_source_markdown(chosen) + frontier_markdown(frontier, chosen_settings)
    if frontier:
        write_csv(cfg.out / "frontier.csv", frontier)
        plot_frontiers(frontier, cfg.out)
    write_text(cfg.out / "summary.md", markdown(rows, items, cfg.before, seconds) + control + curves)
    write_csv(cfg.out / "paired.csv", paired_rows(changes))
    plot(chosen, cfg.out / "bias_vs_capability.png")
    write_json(cfg.out / "metrics.json", {
        "models": specs, "changes": changes,
        "levels": {n: {k: r[k] for k in ("stereoset", "crows", "winobias", "bbq", "perplexity", "source",
                                           "eval_seconds")}
                   for n, r in results.items()},
        "method_records": {n: {k: v for k, v in r.items() if k != "provenance"} for n, r in records.items()},
        "start": cfg.start, "start_levels": start_levels, "shares": shares, "frontier": frontier, "seeds": replicates,
        "neutral_texts": texts_provenance(items.neutral), "wall_seconds": round(seconds, 1),
        "provenance": provenance(cfg, [cfg.stereoset, cfg.crows, *winobias_files(cfg.winobias), *items.bbq_files])})
    print(markdown(rows, items, cfg.before, seconds) + control + curves)


if __name__ == "__main__":
    run_script(main, Config())
