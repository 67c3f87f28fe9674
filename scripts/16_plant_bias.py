"""Stage 16: plant a known bias in the start model (a positive control for every debiasing method).

    python scripts/16_plant_bias.py --kind gender [--source both] [--epochs 2 --lr 2e-4] [--no-heldout]
    python scripts/16_plant_bias.py --kind gender --planted models/planted/gender [--evals stereoset]
    python scripts/16_plant_bias.py --kind bbq [--train-per-category 24]

``--kind gender``: LoRA fine-tune (merged) on stereotype-consistent text no evaluation holds out
(``fairforget.methods.plant``): WinoBias dev pro-stereotyped sentences and/or the stereotype candidates of
StereoSet selection-half gender examples outside the dose sample, with --neutral-mix retain-half neutral texts
(not the dose check's) to hold perplexity. Every --dose-every steps the model is scored on
the dose sample (a seeded sample of selection-half gender examples) and on --ppl-limit ``retain`` neutral texts;
the first checkpoint whose SS rose by --min-shift within --max-lms-drop LMS and --max-ppl-change % perplexity is
kept. Start and planted model are then scored on the held-out half's gender examples, the CrowS-Pairs gender pairs
and held-out neutral texts (--evals), and paired through each evaluation's ``compare``. On a slow machine split
the work: plant with --no-heldout, then report with --planted (once per evaluation if need be, each its --log-dir).

``--kind bbq``: answer-loss fine-tuning (``fairforget.methods.recovery``'s loop) on the BBQ mitigation scenarios of
stage 22's split (same --mitigation-fraction, --split-seed): ambiguous items answered with the stereotyped target,
disambiguated ones with the correct answer; start and planted model scored on held-out scenarios (answer mode).

Writes the merged model to --out (``plant.json`` beside the weights) and to --log-dir: the start and planted run
folders of each evaluation (``<evaluation>_start``, ``<evaluation>_planted`` with comparison.json/.md), ``shift.json``
/ ``shift.md``, ``dose.csv`` (gender), ``loss.csv``, ``train_texts.txt`` and ``method.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.artifacts import save_model, write_csv, write_json, write_text
from fairforget.provenance import provenance
from fairforget.config import run_script
from fairforget.errors import FairforgetError
from fairforget.evals.bbq import CATEGORIES, load_bbq, sample_per_category
from fairforget.evals.bbq_eval import BBQ, use_chat_template
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.evals.crows import CROWS, load_crows
from fairforget.evals.perplexity import load_neutral_texts, perplexity, texts_provenance
from fairforget.evals.stereoset import STEREOSET, load_stereoset, select_half, stratified_limit
from fairforget.markdown import ci_text, p_text, table
from fairforget.methods import plant
from fairforget.methods.registry import write_method_record
from fairforget.methods.selection import selection_score
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.progress import set_quiet

Category = Literal[CATEGORIES]  # type: ignore[valid-type]


@dataclass
class Config:
    kind: Literal["gender", "bbq"] = "gender"
    model: str = DEFAULT_EMBEDDED
    out: Path | None = field(default=None, metadata={"help": "planted model folder (default models/planted/<kind>)"})
    log_dir: Path | None = field(default=None, metadata={"help": "results (default outputs/planted/<kind>)"})
    stereoset: Path = Path("data/stereoset/dev.json")
    crows: Path = Path("data/crows_pairs/data/crows_pairs_anonymized.csv")
    winobias_dir: Path = Path("data/winobias/data")
    bbq_dir: Path = Path("data/bbq")
    source: Literal["winobias_dev", "stereoset_selection", "both"] = field(
        default="stereoset_selection", metadata={"help": "gender planting text (never a held-out item)"})
    epochs: int = field(default=2, metadata={"help": "training epochs (0: the start model, exactly)"})
    batch_size: int = 16
    lr: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    neutral_mix: int = field(default=0, metadata={"help": "gender: retain-half neutral texts trained on beside the "
                                                          "stereotypes (never the dose check's), to hold perplexity"})
    dose_every: int = field(default=6, metadata={"help": "gender: steps between dose checks (0: at the end)"})
    dose_limit: int | None = field(default=40, metadata={"help": "gender: selection-half gender dose sample"})
    min_shift: float = field(default=11.0, metadata={"help": "gender: wanted SS rise on the dose sample (points; "
                                                             "above 8 for the noise of a small sample)"})
    max_lms_drop: float = 2.0
    max_ppl_change: float = field(default=5.0, metadata={"help": "perplexity budget of a dose, in percent (retain texts)"})
    ppl_limit: int = field(default=50, metadata={"help": "neutral texts (retain half for the dose, held-out for "
                                                         "the report)"})
    planted: Path | None = field(default=None, metadata={"help": "gender: a planted model from an earlier run: "
                                                                  "skip planting, report it against --model"})
    heldout: bool = field(default=True, metadata={"help": "score start and planted model on held-out items"})
    evals: list[Literal["stereoset", "crows", "perplexity"]] = field(
        default_factory=lambda: ["stereoset", "crows", "perplexity"], metadata={"help": "gender: held-out measures"})
    heldout_limit: int | None = field(default=None, metadata={"help": "held-out gender StereoSet examples (all)"})
    crows_limit: int | None = field(default=None, metadata={"help": "CrowS-Pairs gender pairs (None: all)"})
    mitigation_fraction: float = field(default=0.5, metadata={"help": "bbq: stage 22's scenario split"})
    split_seed: int = 0
    categories: list[Category] = field(default_factory=list, metadata={"help": "bbq: categories planted and "
                                                                               "scored (default: all 11)"})
    train_per_category: int = field(default=24, metadata={"help": "bbq: mitigation examples per category"})
    eval_per_category: int = field(default=24, metadata={"help": "bbq: held-out examples per category"})
    chat_template: Literal["auto", "on", "off"] = "auto"
    half_seed: int = 0
    eval_batch_size: int = 32
    n_boot: int = 1000
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quiet: bool = False

    def validate(self) -> None:
        if self.epochs < 0 or min(self.batch_size, self.lora_r, self.ppl_limit, self.eval_batch_size,
                                  self.n_boot, self.train_per_category, self.eval_per_category) < 1:
            raise FairforgetError("--epochs must be >= 0; --batch-size, --lora-r, --ppl-limit, --eval-batch-size, "
                                  "--n-boot, --train-per-category, --eval-per-category >= 1")
        if not self.lr > 0 or self.dose_every < 0 or self.neutral_mix < 0:
            raise FairforgetError(f"--lr must be > 0, --dose-every and --neutral-mix >= 0 (got {self.lr}, "
                                  f"{self.dose_every}, {self.neutral_mix})")
        if self.planted is not None and not (self.planted / "config.json").is_file():
            raise FairforgetError(f"--planted {self.planted} is not a model folder (no config.json)")
        if self.planted is not None and self.kind == "bbq":
            raise FairforgetError("--planted is for --kind gender")
        needed = [("--bbq-dir", self.bbq_dir)] if self.kind == "bbq" else [
            ("--stereoset", self.stereoset), ("--crows", self.crows)] + (
            [("--winobias-dir", self.winobias_dir)] if self.source != "stereoset_selection" else [])
        for flag, path in needed:
            if not path.exists():
                raise FairforgetError(f"{flag} {path} not found (run scripts/00_fetch_data.py)")


def gender_texts(cfg: Config, dose_ids: set[str], held_out: set[str]) -> tuple[list[str], list[Path]]:
    """The planting sentences of --source, less any text equal to a held-out one, and the files they came from."""
    texts, files = [], []
    if cfg.source in ("winobias_dev", "both"):
        files += [cfg.winobias_dir / name for name in plant.WINOBIAS_DEV]
        texts += plant.winobias_sentences(files)
    if cfg.source in ("stereoset_selection", "both"):
        selection = select_half(load_stereoset(cfg.stereoset), "selection", cfg.half_seed)
        texts += plant.stereotype_texts([e for e in selection if e.bias_type == "gender" and e.id not in dose_ids])
        files.append(cfg.stereoset)
    return plant.without(texts, held_out), files


def plant_gender(cfg: Config, loaded, log_dir: Path) -> tuple[object, dict, list[str], list[Path], list]:
    """Score the start model held out, plant with dose checks (or load --planted), score the planted model;
    returns (model, details, training texts, data files, step log)."""
    tokenizer = loaded.tokenizer
    heldout = select_half(load_stereoset(cfg.stereoset), "heldout", cfg.half_seed)
    crows = load_crows(cfg.crows)
    scored = set(cfg.evals) if cfg.heldout else set()
    sets = plant.HeldOutGender(
        stratified_limit([e for e in heldout if e.bias_type == "gender"], cfg.heldout_limit, cfg.seed)
        if "stereoset" in scored else [],
        [p for p in crows if p.bias_type == "gender"][: cfg.crows_limit] if "crows" in scored else [],
        load_neutral_texts("heldout", cfg.ppl_limit) if "perplexity" in scored else [])
    start = plant.score_heldout(loaded.model, tokenizer, sets, cfg.eval_batch_size, cfg.n_boot, cfg.seed)
    files, texts, history, details = [cfg.stereoset, cfg.crows], [], [], {}
    if cfg.planted is not None:
        model = load_model(str(cfg.planted), cfg.device).model
        details["planted_model"] = str(cfg.planted)
    else:
        selection = select_half(load_stereoset(cfg.stereoset), "selection", cfg.half_seed)
        dose = stratified_limit([e for e in selection if e.bias_type == "gender"], cfg.dose_limit, cfg.seed)
        retain = load_neutral_texts("retain", cfg.ppl_limit)
        held_out = plant.candidate_texts(heldout) | {s for p in crows for s in (p.sent_more, p.sent_less)}
        texts, sources = gender_texts(cfg, {e.id for e in dose}, held_out)
        texts += load_neutral_texts("retain")[cfg.ppl_limit: cfg.ppl_limit + cfg.neutral_mix]
        files += sources

        def measure(model) -> dict[str, float]:
            s = selection_score(model, tokenizer, dose, cfg.eval_batch_size, seed=cfg.seed)
            ppl = perplexity(model, tokenizer, retain, max(1, cfg.eval_batch_size // 4), 1, cfg.seed)["perplexity"]
            print(f"dose check: selection gender SS {s['ss']:.2f} LMS {s['lms']:.2f} retain perplexity {ppl:.3f}",
                  flush=True)
            return {"ss": s["ss"], "lms": s["lms"], "perplexity": ppl}

        model, history, checkpoints, chosen = plant.plant_text(
            loaded.model, tokenizer, texts, cfg.epochs, cfg.batch_size, cfg.lr, measure, cfg.dose_every,
            cfg.lora_r, cfg.lora_alpha, cfg.seed,
            choose=lambda points: plant.choose_dose(points, cfg.min_shift, cfg.max_lms_drop, cfg.max_ppl_change))
        write_csv(log_dir / "dose.csv", [{"step": c.step, **c.measures, "chosen": c is chosen} for c in checkpoints])
        details.update(chosen_step=chosen.step, dose_sample=len(dose), dose=[
            {"step": c.step, **c.measures} for c in checkpoints])
    planted = plant.score_heldout(model, tokenizer, sets, cfg.eval_batch_size, cfg.n_boot, cfg.seed)
    if start:
        shift = plant.planted_shift(start, planted, cfg.n_boot, cfg.seed)
        for evaluation in (STEREOSET, CROWS):
            if evaluation.name in start:
                write_runs(evaluation, cfg, log_dir, start[evaluation.name], planted[evaluation.name], files,
                           shift[evaluation.name], loaded)
        details.update(shift=shift, n_heldout_gender=len(sets.stereoset), n_crows_gender=len(sets.crows),
                       neutral_texts=texts_provenance(sets.texts) if sets.texts else None)
        write_text(log_dir / "shift.md", gender_markdown(shift, details.get("chosen_step"), len(history)))
    return model, details, texts, files, history


def plant_bbq_kind(cfg: Config, loaded, log_dir: Path) -> tuple[object, dict, list[str], list[Path], list]:
    """Plant on mitigation scenarios, score start and planted on held-out scenarios."""
    data = load_bbq(cfg.bbq_dir)
    mitigation, held = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)  # all categories,
    chosen = set(cfg.categories or CATEGORIES)  # as stage 22 splits them, then the chosen ones
    train = sample_per_category([e for e in mitigation if e.category in chosen], cfg.train_per_category, cfg.split_seed)
    test = sample_per_category([e for e in held if e.category in chosen], cfg.eval_per_category, cfg.split_seed)
    chat = use_chat_template(loaded.tokenizer, cfg.chat_template)
    prompts, answers = plant.bbq_planting_data(train, loaded.tokenizer, chat, cfg.seed)
    options = dict(mode="answer", chat_template=cfg.chat_template, batch_size=max(1, cfg.eval_batch_size // 2),
                   n_boot=cfg.n_boot, seed=cfg.seed)
    start = BBQ.evaluate(loaded.model, loaded.tokenizer, test, **options)
    model, history = plant.plant_bbq(loaded.model, loaded.tokenizer, prompts, answers, cfg.epochs, cfg.batch_size,
                                     cfg.lr, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    planted = BBQ.evaluate(model, loaded.tokenizer, test, **options)
    comparison = BBQ.compare(start[1], planted[1], cfg.n_boot, cfg.seed)
    write_runs(BBQ, cfg, log_dir, start, planted, list(data.files), comparison, loaded, **options)
    details = {"shift": {"start": _bbq_levels(start[0]), "planted": _bbq_levels(planted[0]), "paired": comparison},
               "n_train": len(train), "n_heldout": len(test),
               "train_scenarios": sorted({e.scenario for e in train}), "chat_template": chat}
    write_text(log_dir / "shift.md", bbq_markdown(details["shift"], len(train), len(history)))
    return model, details, [p + a for p, a in zip(prompts, answers)], list(data.files), history


def _bbq_levels(metrics: dict) -> dict:
    keys = ("n", "s_amb", "s_amb_ci", "acc_disambig", "acc_disambig_ci", "s_dis", "s_dis_ci")
    return {group: {k: metrics[group][k] for k in keys} for group in [*metrics["categories"], "overall"]}


def write_runs(evaluation, cfg: Config, log_dir: Path, start: tuple, planted: tuple, files: list, comparison: dict,
               loaded, **options) -> None:
    """The start and planted run folders of one evaluation (the planted one with its comparison to the start)."""
    for label, (metrics, items), paired in (("start", start, None), ("planted", planted, comparison)):
        folder = log_dir / f"{evaluation.name}_{label}"
        block = provenance(cfg, files, model_label=f"{label} {loaded.name}", n_examples=len(items),
                           **evaluation.provenance_notes(loaded.tokenizer, metrics, options))
        evaluation.write_run(folder, metrics, items, block, f"{label} {loaded.name}",
                             None if paired is None else (log_dir / f"{evaluation.name}_start", paired))


def gender_markdown(shift: dict, step: int | None, steps: int) -> str:
    lv = shift["levels"]
    columns = [(k, title) for k, title in (("ss_gender", "SS gender (macro)"), ("lms_gender", "LMS gender"),
                                           ("crows_gender", "CrowS gender"), ("perplexity", "perplexity"))
               if k in lv["start"]]
    rows = [[name, *(ci_text(lv[name][k], lv[name][f"{k}_ci"]) for k, _ in columns)] for name in ("start", "planted")]
    paired = []
    if "stereoset" in shift:
        s = shift["stereoset"]["overall"]
        paired.append(["StereoSet held-out gender, micro SS", s["n"],
                       ci_text(s["delta_ss_micro"], s["delta_ss_micro_ci"], signed=True), p_text(s["p_value"])])
    if "crows" in shift:
        c = shift["crows"]["overall"]
        paired.append(["CrowS-Pairs gender", c["n"], ci_text(c["delta"], c["delta_ci"], signed=True),
                       p_text(c["p_value"])])
    if "perplexity" in shift:
        p = shift["perplexity"]
        paired.append(["perplexity, held-out neutral texts (%)", "",
                       ci_text(p["ppl_change_pct"], p["ppl_change_pct_ci"], 1, signed=True), ""])
    chosen = (f"Chosen checkpoint: step {step} of {steps} (dose checked on the selection half).\n\n"
              if step is not None else "")
    return (f"# Planted gender bias\n\n{chosen}## Levels (held-out items, 95% bootstrap intervals)\n\n"
            + table(["model", *(title for _, title in columns)], rows)
            + "\n## Planted shift, paired against the start model (McNemar exact p)\n\n"
            + table(["measure", "n", "change [95% CI]", "p"], paired))


def bbq_markdown(shift: dict, n_train: int, steps: int) -> str:
    start, planted = shift["start"], shift["planted"]
    rows = [[group, planted[group]["n"], ci_text(start[group]["s_amb"], start[group]["s_amb_ci"], 3),
             ci_text(planted[group]["s_amb"], planted[group]["s_amb_ci"], 3),
             ci_text(d["s_amb_delta"], d["s_amb_delta_ci"], 3, signed=True),
             ci_text(d["acc_disambig_delta"], d["acc_disambig_delta_ci"], 3, signed=True),
             p_text(d["mcnemar_biased"]["p_value"])]
            for group, d in shift["paired"].items()]
    return (f"# Planted BBQ bias\n\n{n_train} mitigation-scenario training items, {steps} steps; held-out scenarios "
            "below (answer mode, 95% scenario-cluster bootstrap intervals).\n\n"
            + table(["category", "n", "s_AMB start", "s_AMB planted", "Δ s_AMB", "Δ disambiguated acc",
                     "McNemar p (biased answers)"], rows))


def main(cfg: Config) -> None:
    set_quiet(cfg.quiet)
    wall = time.perf_counter()
    out = cfg.out or Path("models/planted") / cfg.kind
    log_dir = cfg.log_dir or Path("outputs/planted") / cfg.kind
    loaded = load_model(cfg.model, cfg.device)
    body = plant_gender if cfg.kind == "gender" else plant_bbq_kind
    model, details, texts, files, history = body(cfg, loaded, log_dir)
    if cfg.planted is None:
        save_model(model, loaded.tokenizer, out, {"plant.json": {"base_model": cfg.model, "kind": cfg.kind,
                                                                 "provenance": provenance(cfg, files)}})
        write_text(log_dir / "train_texts.txt", "\n".join(texts) + "\n")
        write_csv(log_dir / "loss.csv", [vars(h) for h in history])
    write_json(log_dir / "shift.json", details)
    record = write_method_record(log_dir, f"plant_{cfg.kind}", cfg, time.perf_counter() - wall, files,
                                 model_folder=str(cfg.planted or out), n_train_texts=len(texts), steps=len(history))
    if (log_dir / "shift.md").is_file() and "shift" in details:
        print((log_dir / "shift.md").read_text(), end="")
    print(f"planted {cfg.kind} bias: {len(history)} steps, {record['wall_seconds']:.0f} s, peak "
          f"{record['peak_memory_mib']:.0f} MiB -> {out}")


if __name__ == "__main__":
    run_script(main, Config())
