"""Stage 22: BBQ bias mitigation by soft-pruning attention heads, recovery fine-tuning, held-out re-evaluation.

    python scripts/22_mitigate_heads.py --model embedded:smollm2-135m-instruct --mitigation-per-category 40 \\
        --eval-per-category 40 [--protect-top 10] [--recovery full]

1. BBQ scenarios (templates linked by a shared question string, fairforget.bbq_split) are split by
   --split-seed into a mitigation share and a held-out share: no question is on both sides. Examples are
   sampled per category from each side (stratified), also by --split-seed, so --seed (option order,
   bootstrap, training) can vary while the held-out items stay the same.
2. Mitigation set: context influence of each example, CI = KL(p_full || p_question) of the option-letter
   distributions with and without the context, and every head's activity at the answer position in the same
   forward passes (hooks on each layer's output projection): the output norm (``norm``) and the distance
   between the full and the context-free head output (``delta``). Pearson r of every (layer, head) with CI.
3. Soft-pruning: head h of layer l is scaled by (1 - s) in its slice of the output projection (correct
   under grouped-query attention; k/v projections untouched), s from |r| thresholds (default the
   predecessor's 0.7/0.5/0.3/0.05 -> 0.9/0.7/0.5/0.1). --protect-top N keeps the N selected heads whose
   pruning most raises the gold-answer loss on disambiguated mitigation examples (first-order estimate).
4. Recovery fine-tuning on the disambiguated mitigation examples only, loss on the gold answer letter;
   LoRA (merged afterwards) by default, --recovery full for all weights; output projections stay frozen.
   Its training state is saved every --checkpoint-every steps: a killed run started again resumes there.
5. Held-out evaluation before, after pruning and after recovery with the BBQ evaluation (stage 20's), paired
   comparisons against before; the pruned and recovered models saved as Hugging Face folders; then the
   localization of stage 21 on the recovered model (``after``).

Writes to --out (default outputs/mitigation/<model>/): split.json, context_influence.jsonl,
head_correlation.csv (layer x head r of the chosen activity), head_correlations_long.csv (r, p, strength,
cost, protected per head and activity), head_correlation.png, before/ pruned/ recovered/ (stage-20 run
folders), unlearning_results.csv, bias_scores_after.txt, stages_*.png, recovery_log.csv, metrics.json.
Models: <models-dir>/pruned/<model>/ and <models-dir>/recovered/<model>/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fairforget.artifacts import atomic_dir, provenance, sha256_text, write_csv, write_json, write_jsonl, write_text
from fairforget.bbq import (CATEGORIES, LETTERS, PROMPT_TEMPLATE, QUESTION_ONLY_TEMPLATE, build_prompt,
                            evaluate_bbq, load_bbq, option_order, sample_per_category, use_chat_template,
                            write_bbq_run)
from fairforget.bbq_metrics import METRICS, compare_runs, format_table, metric_groups
from fairforget.checkpoint import Checkpointer
from fairforget.config import config_to_dict, run_script
from fairforget.errors import FairforgetError
from fairforget.heads import (PRESET_STRENGTHS, PRESET_THRESHOLDS, batch_prompts, correlation_pvalues,
                              head_activity, head_correlations, head_layout, protect_heads, pruning_cost,
                              pruning_strengths, scale_heads)
from fairforget.localization import run_localization
from fairforget.models import DEFAULT_EMBEDDED, load_model, model_name
from fairforget.plots import interval_bars, layer_head_panel
from fairforget.recovery import finetune_answers, merged, prepare_model
from fairforget.bbq_split import split_by_scenario

Category = Literal[CATEGORIES]  # type: ignore[valid-type]
STAGES = ("before", "pruned", "recovered")


@dataclass
class Config:
    model: str = DEFAULT_EMBEDDED
    data_dir: Path = Path("data/bbq")
    categories: list[Category] = field(default_factory=list, metadata={"help": "BBQ categories (default: all 11)"})
    mitigation_fraction: float = field(default=0.5, metadata={"help": "share of each category's scenarios used "
                                                                     "for mitigation (the rest are held out)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the scenario split and of the per-category "
                                                         "samples on each side"})
    mitigation_per_category: int = 40
    eval_per_category: int = 40
    activity: Literal["delta", "norm"] = field(
        default="delta", metadata={"help": "head scalar correlated with context influence: distance of the head "
                                           "output full vs context-free, or its norm (both are reported)"})
    thresholds: list[float] = field(default_factory=lambda: list(PRESET_THRESHOLDS),
                                    metadata={"help": "|r| thresholds, decreasing"})
    strengths: list[float] = field(default_factory=lambda: list(PRESET_STRENGTHS),
                                   metadata={"help": "pruning strength for each threshold"})
    protect_top: int = field(default=0, metadata={"help": "keep the N selected heads whose pruning costs most"})
    protect_examples: int = field(default=64, metadata={"help": "disambiguated mitigation examples for the cost"})
    recovery: Literal["lora", "full", "none"] = "lora"
    recovery_epochs: int = 2
    recovery_lr: float | None = field(default=None, metadata={"help": "default 2e-4 for LoRA, 1e-5 for full"})
    recovery_batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=list, metadata={"help": "default: the architecture's LoRA "
                                                                            "targets without the output projection"})
    mode: Literal["letter", "answer"] = "letter"
    chat_template: Literal["auto", "on", "off"] = "auto"
    batch_size: int = 16
    n_boot: int = 1000
    localize_per_category: int = field(default=10, metadata={"help": "stage-21 localization of the recovered "
                                                                     "model (0: skip); same sample as stage 21"})
    localize_batch_size: int = 8
    localization_root: Path = Path("outputs/localization")
    models_dir: Path = Path("models")
    checkpoint_every: int = field(default=20, metadata={"help": "save the recovery training state every N steps "
                                                                "(<models-dir>/recovered/<model>_resume/) so a "
                                                                "killed run resumes (0: off)"})
    out: Path | None = field(default=None, metadata={"help": "run folder (default outputs/mitigation/<model>)"})
    seed: int = field(default=0, metadata={"help": "option order, bootstrap and training seed"})
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        for name in ("mitigation_per_category", "eval_per_category", "batch_size", "n_boot", "recovery_epochs",
                     "recovery_batch_size", "lora_r", "localize_batch_size"):
            if getattr(self, name) < 1:
                raise FairforgetError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise FairforgetError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.protect_top < 0 or self.protect_examples < 1 or self.localize_per_category < 0:
            raise FairforgetError("--protect-top and --localize-per-category must be >= 0, --protect-examples >= 1")
        if self.recovery_lr is not None and self.recovery_lr <= 0:
            raise FairforgetError(f"--recovery-lr must be positive, got {self.recovery_lr}")
        pruning_strengths(torch.zeros(1), self.thresholds, self.strengths)  # raises on a bad schedule


def gold_letter(example, order) -> int:
    return list(order).index(example.label)


def split_summary(mitigation, held_out) -> dict:
    """Per category and side, the templates and scenarios sampled."""
    summary: dict = {}
    for name, side in (("mitigation", mitigation), ("held_out", held_out)):
        for e in side:
            entry = summary.setdefault(e.category, {}).setdefault(name, {"templates": set(), "scenarios": set()})
            entry["templates"].add(e.question_index)
            entry["scenarios"].add(e.scenario)
    return {c: {k: {part: sorted(v) for part, v in side.items()} for k, side in sides.items()}
            for c, sides in sorted(summary.items())}


def correlation_rows(r: dict[str, torch.Tensor], p: dict[str, torch.Tensor], strengths: torch.Tensor,
                     cost: torch.Tensor | None, protected: list, chosen: str) -> list[dict]:
    rows = []
    for layer in range(strengths.shape[0]):
        for head in range(strengths.shape[1]):
            row = {"layer": layer, "head": head}
            for name in r:
                row[f"r_{name}"] = round(float(r[name][layer, head]), 6)
                row[f"p_{name}"] = float(p[name][layer, head])
            row["activity"] = chosen
            row["strength"] = float(strengths[layer, head])
            row["pruning_cost"] = None if cost is None else float(cost[layer, head])
            row["protected"] = (layer, head) in protected
            rows.append(row)
    return rows


def plot_correlation(path: Path, r: dict[str, torch.Tensor], strengths: torch.Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fairforget.artifacts import save_figure

    panels = [(f"Pearson r ({name})", m.numpy(), "RdBu_r", (-1, 1)) for name, m in r.items()]
    panels.append(("pruning strength", strengths.numpy(), "Reds", (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 7.0), sharey=True)
    for ax, (name, matrix, cmap, (low, high)) in zip(axes, panels):
        bound = max(abs(matrix).max(), 1e-6) if low < 0 else high
        layer_head_panel(fig, ax, matrix, name, cmap, -bound if low < 0 else low, bound, fontsize=9)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    save_figure(fig, path)


def results_rows(metrics: dict[str, dict], comparisons: dict[str, dict]) -> list[dict]:
    """unlearning_results.csv: per category and overall, per stage, metrics with intervals and paired tests."""
    rows = []
    for stage, m in metrics.items():
        for group, g in metric_groups(m).items():
            row = {"category": group, "stage": stage, "n": g["n"]}
            for name in METRICS:
                row[name] = g[name]
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = g[f"{name}_ci"]
            if stage in comparisons:
                c = comparisons[stage][group]
                for name in METRICS:
                    row[f"{name}_delta"] = c[f"{name}_delta"]
                    row[f"{name}_delta_ci_low"], row[f"{name}_delta_ci_high"] = c[f"{name}_delta_ci"]
                row["mcnemar_correct_p"] = c["mcnemar_correct"]["p_value"]
                row["mcnemar_biased_p"] = c["mcnemar_biased"]["p_value"]
            rows.append(row)
    return rows


def comparison_text(comparisons: dict[str, dict]) -> str:
    lines = []
    for stage, comparison in comparisons.items():
        lines.append(f"\nPaired change vs before ({stage} - before, same held-out items; 95% paired-bootstrap CI; "
                     f"McNemar exact p on correct / biased answers)")
        header = f"{'category':<20} {'d acc':>24}  {'d s_DIS':>24}  {'d s_AMB':>24}  {'p corr':>7} {'p bias':>7}"
        lines += [header, "-" * len(header)]
        for group, c in comparison.items():
            cells = [f"{c[f'{n}_delta']:+.3f} [{c[f'{n}_delta_ci'][0]:+.3f}, {c[f'{n}_delta_ci'][1]:+.3f}]"
                     for n in ("acc", "s_dis", "s_amb")]
            lines.append(f"{group:<20} {cells[0]:>24}  {cells[1]:>24}  {cells[2]:>24}  "
                         f"{c['mcnemar_correct']['p_value']:>7.3g} {c['mcnemar_biased']['p_value']:>7.3g}")
    return "\n".join(lines) + "\n"


def save_model(model, tokenizer, folder: Path, info: dict) -> None:
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "fairforget_mitigation.json", info)


def main(cfg: Config) -> None:
    timings: dict[str, float] = {}
    clock = time.time()
    data = load_bbq(cfg.data_dir, cfg.categories or None)
    mitigation_pool, held_pool = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)
    mitigation = sample_per_category(mitigation_pool, cfg.mitigation_per_category, cfg.split_seed)
    held_out = sample_per_category(held_pool, cfg.eval_per_category, cfg.split_seed)
    loaded = load_model(cfg.model, cfg.device, cfg.dtype)
    model, tokenizer, name = loaded.model, loaded.tokenizer, model_name(cfg.model)
    layout = head_layout(model)  # a clear error for models without attention heads, before any work
    chat = use_chat_template(tokenizer, cfg.chat_template)
    chat_tok = tokenizer if chat else None
    out = cfg.out or Path("outputs/mitigation") / name
    write_json(out / "split.json", {"split_seed": cfg.split_seed, "unit": "scenario", "mitigation_fraction": cfg.mitigation_fraction,
                                    "n_mitigation": len(mitigation), "n_held_out": len(held_out),
                                    "templates": split_summary(mitigation, held_out)})
    print(f"{len(mitigation)} mitigation / {len(held_out)} held-out examples (disjoint scenarios); "
          f"{layout.n_layers} layers x {layout.n_heads} heads; {loaded.source}", flush=True)

    orders = [option_order(e, cfg.seed) for e in mitigation]
    full = [build_prompt(e, o, True, chat_tok) for e, o in zip(mitigation, orders)]
    question = [build_prompt(e, o, False, chat_tok) for e, o in zip(mitigation, orders)]
    start = time.time()
    activity = head_activity(model, tokenizer, full, question, LETTERS, cfg.batch_size)
    timings["context_influence_and_heads"] = time.time() - start
    write_jsonl(out / "context_influence.jsonl", [
        {"category": e.category, "example_id": e.example_id, "question_index": e.question_index,
         "context_condition": e.context_condition, "option_order": list(o), "p_full": pf, "p_question": pq,
         "context_influence": ci}
        for e, o, pf, pq, ci in zip(mitigation, orders, activity.p_full.tolist(), activity.p_question.tolist(),
                                    activity.influence.tolist())])
    r = {kind: head_correlations(getattr(activity, kind), activity.influence) for kind in ("delta", "norm")}
    p = {kind: correlation_pvalues(r[kind], len(mitigation)) for kind in r}
    strengths = pruning_strengths(r[cfg.activity], cfg.thresholds, cfg.strengths)

    cost, protected = None, []
    disambig = [i for i, e in enumerate(mitigation) if e.context_condition == "disambig"]
    if cfg.protect_top:
        start = time.time()
        chosen = disambig[: cfg.protect_examples]
        device = next(model.parameters()).device
        batches, golds = [], []
        for k in range(0, len(chosen), cfg.batch_size):
            idx = chosen[k: k + cfg.batch_size]
            batches.append(batch_prompts(tokenizer, [full[i] for i in idx], device))
            golds.append(torch.tensor([gold_letter(mitigation[i], orders[i]) for i in idx]))
        from fairforget.choice_scoring import letter_token_ids

        cost = pruning_cost(model, layout, batches, golds, letter_token_ids(tokenizer, LETTERS), strengths)
        strengths, protected = protect_heads(strengths, cost, cfg.protect_top)
        timings["protection"] = time.time() - start
    write_csv(out / "head_correlations_long.csv", correlation_rows(r, p, strengths, cost, protected, cfg.activity))
    write_csv(out / "head_correlation.csv",
              [{"layer": layer, **{f"head_{h}": round(float(v), 6) for h, v in enumerate(row)}}
               for layer, row in enumerate(r[cfg.activity])])
    plot_correlation(out / "head_correlation.png", r, strengths,
                     f"{name}: head activity vs context influence (n={len(mitigation)})")
    pruned_heads = int((strengths > 0).sum())
    print(f"context influence mean {activity.influence.mean():.4f}; max |r| ({cfg.activity}) "
          f"{r[cfg.activity].abs().max():.3f}; {pruned_heads} heads pruned (strength sum "
          f"{strengths.sum():.2f}); {len(protected)} protected", flush=True)

    metrics, items, comparisons = {}, {}, {}

    def evaluate(stage: str) -> None:
        start = time.time()
        metrics[stage], items[stage] = evaluate_bbq(model, tokenizer, held_out, cfg.mode, cfg.chat_template,
                                                    cfg.batch_size, cfg.n_boot, cfg.seed)
        timings[f"evaluate_{stage}"] = time.time() - start
        block = provenance(cfg, data.files, model_source=loaded.source, stage=stage, device=str(loaded.device),
                           prompt_template=PROMPT_TEMPLATE, prompt_template_sha256=sha256_text(PROMPT_TEMPLATE),
                           chat_template=chat, wall_seconds=round(timings[f"evaluate_{stage}"], 1))
        write_bbq_run(out / stage, metrics[stage], items[stage], block)
        if stage != "before":
            comparisons[stage] = compare_runs(items["before"], items[stage], cfg.n_boot, cfg.seed)
        o = metrics[stage]["overall"]
        print(f"[{stage}] acc {o['acc']:.3f}  s_DIS {o['s_dis']:+.3f} [{o['s_dis_ci'][0]:+.3f}, "
              f"{o['s_dis_ci'][1]:+.3f}]  s_AMB {o['s_amb']:+.3f} [{o['s_amb_ci'][0]:+.3f}, {o['s_amb_ci'][1]:+.3f}] "
              f"({timings[f'evaluate_{stage}']:.0f} s)", flush=True)

    evaluate("before")
    scale_heads(model, strengths, layout)
    info = {"base_model": cfg.model, "activity": cfg.activity, "thresholds": cfg.thresholds,
            "strengths": cfg.strengths, "protected": protected, "head_strengths": strengths.tolist(),
            "out_projection": layout.out_proj_name}
    save_model(model, tokenizer, cfg.models_dir / "pruned" / name, info)
    evaluate("pruned")

    history = []
    if cfg.recovery != "none":
        start = time.time()
        train = [mitigation[i] for i in disambig]
        lr = cfg.recovery_lr or (2e-4 if cfg.recovery == "lora" else 1e-5)
        model = prepare_model(model, cfg.recovery, cfg.lora_targets or None, cfg.lora_r, cfg.lora_alpha,
                              cfg.lora_dropout, cfg.seed)
        resume = Checkpointer(cfg.models_dir / "recovered" / f"{name}_resume", cfg.checkpoint_every,
                              fingerprint=config_to_dict(cfg))
        history = finetune_answers(model, tokenizer, [full[i] for i in disambig],
                                   [gold_letter(e, orders[i]) for e, i in zip(train, disambig)], LETTERS,
                                   cfg.recovery_epochs, cfg.recovery_batch_size, lr, cfg.seed, checkpoint=resume)
        model = merged(model)
        timings["recovery"] = time.time() - start
        write_csv(out / "recovery_log.csv", [vars(h) for h in history])
        save_model(model, tokenizer, cfg.models_dir / "recovered" / name,
                   dict(info, recovery=cfg.recovery, recovery_lr=lr, recovery_examples=len(train)))
        resume.clear()
        epochs = {h.epoch: [] for h in history}
        for h in history:
            epochs[h.epoch].append(h.loss)
        print(f"recovery ({cfg.recovery}, {len(train)} disambiguated examples): mean loss per epoch "
              + ", ".join(f"{np.mean(v):.3f}" for v in epochs.values()) + f" ({timings['recovery']:.0f} s)", flush=True)
        evaluate("recovered")

    final = "recovered" if "recovered" in metrics else "pruned"
    rows = results_rows(metrics, comparisons)
    write_csv(out / "unlearning_results.csv", rows, list(dict.fromkeys(k for row in rows for k in row)))
    write_text(out / "bias_scores_after.txt",
               f"BBQ on held-out templates after head pruning{' and recovery' if final == 'recovered' else ''} "
               f"({final}); {metrics[final]['definition']}\n\n{format_table(metrics[final])}"
               + comparison_text(comparisons))
    groups = list(metric_groups(metrics["before"]))
    for metric, label in (("s_amb", "s_AMB"), ("s_dis", "s_DIS"), ("acc", "accuracy")):
        series = {stage: ([metric_groups(m)[g][metric] for g in groups],
                          [tuple(np.nan_to_num(metric_groups(m)[g][f"{metric}_ci"], nan=metric_groups(m)[g][metric]))
                           for g in groups]) for stage, m in metrics.items()}
        interval_bars(out / f"stages_{metric}.png", groups, series, f"{name}: held-out BBQ {label} by stage",
                      label, reference=0.0 if metric != "acc" else None)

    summary = {"model": cfg.model, "n_mitigation": len(mitigation), "n_held_out": len(held_out),
               "n_recovery_examples": len(disambig) if history else 0, "heads_pruned": pruned_heads,
               "heads_by_strength": {str(s): int((strengths == s).sum()) for s in sorted(set(cfg.strengths))},
               "protected": protected, "context_influence_mean": float(activity.influence.mean()),
               "max_abs_r": {k: float(v.abs().max()) for k, v in r.items()},
               "heads_significant_bonferroni_0.05": {k: int((v < 0.05 / v.numel()).sum()) for k, v in p.items()},
               "heads_p_below_0.05": {k: int((v < 0.05).sum()) for k, v in p.items()},
               "overall": {s: {k: metric_groups(m)["overall"][k] for k in (*METRICS, *[f"{x}_ci" for x in METRICS])}
                           for s, m in metrics.items()},
               "paired_overall": {s: c["overall"] for s, c in comparisons.items()}}
    if cfg.localize_per_category:
        start = time.time()
        examples = sample_per_category(data.examples, cfg.localize_per_category, cfg.seed)
        root = cfg.localization_root / name
        run_localization(model, tokenizer, examples, root / "after", f"{name} ({final})", chat_tok, cfg.seed,
                         cfg.localize_batch_size,
                         provenance(cfg, data.files, model_source=f"{final} model of stage 22", chat_template=chat),
                         compare_to=root / "before")
        timings["localization_after"] = time.time() - start
    timings["total"] = time.time() - clock
    summary["wall_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    write_json(out / "metrics.json", dict(summary, provenance=provenance(
        cfg, data.files, model_source=loaded.source, chat_template=chat, device=str(loaded.device),
        prompt_template=PROMPT_TEMPLATE, question_only_template=QUESTION_ONLY_TEMPLATE,
        prompt_template_sha256=sha256_text(PROMPT_TEMPLATE))))
    print(format_table(metrics[final]) + comparison_text(comparisons), end="")
    print(f"total {timings['total']:.0f} s -> {out}")


if __name__ == "__main__":
    run_script(main, Config())
