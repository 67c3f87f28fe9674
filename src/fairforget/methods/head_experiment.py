"""Stage 22's experiment as plain functions over a typed :class:`HeadRunConfig`: split BBQ and build the held-out
suite (:func:`prepare`), choose heads (:func:`choose_heads`), score every control on the same held-out items
(:func:`evaluate_controls`), the dose-response (:func:`dose_response`), recovery (:func:`recover`),
localization (:func:`localize`) and the run folder's summary (:func:`write_summary`), each writing its own
files through ``fairforget.artifacts``. Scoring and pairing are the suite's (:mod:`fairforget.evals.suite`); the
rows, tables and chosen-minus-random comparison are :mod:`fairforget.methods.head_controls`'.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fairforget import plots
from fairforget.artifacts import save_model, sha256_text, write_csv, write_json, write_jsonl, write_text
from fairforget.checkpoint import Checkpointer
from fairforget.config import config_to_dict, typed_config
from fairforget.evals.bbq import sample_per_category
from fairforget.evals.bbq_eval import PROMPT_TEMPLATE, QUESTION_ONLY_TEMPLATE, build_prompt, option_order, write_bbq_run
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.evals.localization import run_localization
from fairforget.evals.perplexity import texts_provenance
from fairforget.evals.suite import Items, SuiteConfig, held_out_items, score_items
from fairforget.heads import head_layout, pruned, scale_heads
from fairforget.methods import head_controls as hc
from fairforget.methods import head_pruning as hp
from fairforget.methods.head_pruning import HeadPruningConfig, HeadRunConfig
from fairforget.methods.registry import CONFIG_FILE, Knob, MethodSpec, method_config, register_method
from fairforget.methods.selection import selection_examples, setting_name
from fairforget.models import model_name
from fairforget.run_folders import beside

MITIGATION_INFO = "fairforget_mitigation.json"


@dataclass
class Material:
    """What every step reads: the model, the BBQ split, the held-out suite, the run folder, the provenance
    block, and the wall time of each step so far."""

    loaded: Any
    chat_tokenizer: Any  # the tokenizer when the chat template is on, else None
    layout: Any
    mitigation: list
    held_out: list
    suite: SuiteConfig
    items: Items
    out: Path
    name: str
    provenance: dict
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, **extra: Any) -> dict:
        """The provenance block, with ``extra``."""
        return {**self.provenance, **extra}

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        start = time.time()
        yield
        self.timings[key] = self.timings.get(key, 0.0) + time.time() - start


@dataclass
class Choice:
    """The head signal, the chosen strengths [layers, heads] and the protected heads."""

    signal: hp.HeadSignal
    strengths: torch.Tensor
    protected: list


def suite_config(cfg: HeadRunConfig) -> SuiteConfig:
    """The held-out suite of the controls: the evaluations in ``cfg.evals`` (BBQ items are the split's)."""
    return SuiteConfig(cfg.stereoset_path if "stereoset" in cfg.evals else None,
                       cfg.crows_path if "crows" in cfg.evals else None, None, None,
                       stereoset_limit=cfg.stereoset_limit, gender_limit=cfg.stereoset_gender_limit,
                       crows_limit=cfg.crows_limit, crows_gender=False,
                       ppl_limit=cfg.perplexity_texts if "perplexity" in cfg.evals else 0, half_seed=cfg.half_seed,
                       bbq_mode=cfg.mode, chat_template=cfg.chat_template, permutations=cfg.permutations,
                       batch_size=cfg.batch_size, bbq_batch_size=cfg.batch_size, ppl_batch_size=cfg.batch_size,
                       n_boot=cfg.n_boot, seed=cfg.seed, device=cfg.device)


def prepare(cfg: HeadRunConfig, data: Any, loaded: Any, chat: bool, out: Path, provenance_block: dict) -> Material:
    """Split BBQ by scenario, build the held-out suite, write ``split.json``; the provenance block gains what
    stage 20's records (model, templates, scoring) and the held-out sets."""
    layout = head_layout(loaded.model)  # a clear error for models without heads, before any work
    mitigation_pool, held_pool = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)
    mitigation = sample_per_category(mitigation_pool, cfg.mitigation_per_category, cfg.split_seed)
    held_out = sample_per_category(held_pool, cfg.eval_per_category, cfg.split_seed)
    suite = suite_config(cfg)
    items = held_out_items(suite, held_out)
    source = loaded.tokenizer.chat_template if chat else None
    block = {**provenance_block, "model_source": loaded.source, "device": str(loaded.device),
             "batch_size": cfg.batch_size, "n_examples": len(held_out), "held_out_sets": items.sizes(),
             "prompt_template": PROMPT_TEMPLATE, "prompt_template_sha256": sha256_text(PROMPT_TEMPLATE),
             "question_only_template_sha256": sha256_text(QUESTION_ONLY_TEMPLATE), "chat_template": chat,
             "chat_template_sha256": sha256_text(source) if source else None,
             "scoring": (f"letter: p(letter)+p(' '+letter), renormalised over A/B/C, permutations {cfg.permutations}"
                         if cfg.mode == "letter" else "answer: per-token mean log-likelihood of ' '+answer text"),
             "perplexity_texts": texts_provenance(items.neutral) if items.neutral else None}
    run = Material(loaded, loaded.tokenizer if chat else None, layout, mitigation, held_out, suite, items, Path(out),
                   model_name(cfg.model), block)
    mitigation_scenarios = {e.scenario for e in mitigation}
    write_json(run.out / "split.json", {
        "split_seed": cfg.split_seed, "unit": "scenario", "mitigation_fraction": cfg.mitigation_fraction,
        "n_mitigation": len(mitigation), "n_held_out": len(held_out),
        "shared_scenarios": len(mitigation_scenarios & {e.scenario for e in held_out}),
        "mitigation_scenarios": sorted(mitigation_scenarios),
        "held_out_scenarios": sorted({e.scenario for e in held_out}), "held_out_sets": items.sizes()})
    print(f"{len(mitigation)} mitigation / {len(held_out)} held-out BBQ examples (disjoint scenarios); "
          f"held-out sets {items.sizes()}; {layout.n_layers} layers x {layout.n_heads} heads; {loaded.source}",
          flush=True)
    return run


def _prompts(run: Material, seed: int) -> tuple[list, list[str]]:
    orders = [option_order(e, seed) for e in run.mitigation]
    return orders, [build_prompt(e, o, True, run.chat_tokenizer) for e, o in zip(run.mitigation, orders)]


def choose_heads(run: Material, cfg: HeadRunConfig) -> Choice:
    """The head signal, the chosen (and protected) heads; writes head_signal.csv/.png (and the BBQ signal's
    context_influence.jsonl)."""
    with run.timed("signal"):
        if cfg.signal == "stereoset":
            examples = selection_examples(cfg.stereoset_path, cfg.signal_domain, cfg.signal_limit, cfg.half_seed,
                                          cfg.seed)
            signal = hp.stereoset_signal(run.loaded.model, run.loaded.tokenizer, examples, cfg.batch_size)
        else:
            signal, act, orders = hp.bbq_signal(run.loaded.model, run.loaded.tokenizer, run.mitigation, cfg.mode,
                                                run.chat_tokenizer, cfg.seed, cfg.batch_size, cfg.activity)
            write_jsonl(run.out / "context_influence.jsonl", [
                {"category": e.category, "example_id": e.example_id, "context_condition": e.context_condition,
                 "option_order": list(o), "p_full": pf, "p_question": pq, "context_influence": ci}
                for e, o, pf, pq, ci in zip(run.mitigation, orders, act.p_full.tolist(), act.p_question.tolist(),
                                            act.influence.tolist())])
    strengths = hp.select_heads(signal, cfg.select, cfg.k, cfg.q, cfg.signed, cfg.strength)
    protected, cost = [], None
    if cfg.protect_top:
        orders, prompts = _prompts(run, cfg.seed)
        with run.timed("protection"):
            strengths, protected, cost = hp.protect(run.loaded.model, run.loaded.tokenizer, run.mitigation, prompts, orders,
                                                    strengths, cfg)
    p_used = signal.pvalues(cfg.signed)
    write_csv(run.out / "head_signal.csv", [
        {"layer": l, "head": h, "score": float(signal.score[l, h]), "p_two_sided": float(signal.p_two_sided[l, h]),
         "p_used": float(p_used[l, h]), "strength": float(strengths[l, h]),
         "pruning_cost": None if cost is None else float(cost[l, h]), "protected": (l, h) in protected}
        for l in range(run.layout.n_layers) for h in range(run.layout.n_heads)])
    fig, axes = plots.new_figure(1, 2, figsize=(8, 7), sharey=True)
    bound = float(signal.score.abs().max()) or 1.0
    plots.layer_head_panel(fig, axes[0], signal.score.numpy(), f"{cfg.signal} signal", "RdBu_r", -bound, bound)
    plots.layer_head_panel(fig, axes[1], strengths.numpy(), "pruning strength", "Reds", 0, 1)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"{run.name}: head signal (n={signal.n}) and chosen heads")
    plots.save_figure(fig, run.out / "head_signal.png")
    print(f"signal {cfg.signal} over {signal.n} examples: {int((p_used < 0.05).sum())} heads p < 0.05; "
          f"{cfg.select} chose {int((strengths > 0).sum())} heads at strength {cfg.strength} "
          f"({len(protected)} protected)", flush=True)
    return Choice(signal, strengths, protected)


def evaluate(run: Material, label: str, model: Any, bbq_only: bool = False) -> dict:
    """One variant's scores on the held-out suite (BBQ alone with ``bbq_only``); a full evaluation also
    writes its stage-20 run folder ``<out>/<label>/`` with its StereoSet and CrowS-Pairs items."""
    start = time.time()
    scores = score_items(model, run.loaded.tokenizer, run.items.only("bbq") if bbq_only else run.items, run.suite)
    seconds = time.time() - start
    run.timings["evaluations"] = run.timings.get("evaluations", 0.0) + seconds
    o = scores["bbq"][0]["overall"]
    row = hc.summary_row(scores, run.items, 1, 0)
    short = " ".join(f"{k} {row[k]:.2f}" for k in ("ss_gender", "lms_gender", "ss_overall", "crows", "ppl") if k in row)
    print(f"[{label}] BBQ acc_dis {o['acc_disambig']:.3f} s_AMB {o['s_amb']:+.3f} s_DIS {o['s_dis']:+.3f}"
          + ("" if bbq_only else f" | {short}") + f" ({seconds:.0f} s)", flush=True)
    if not bbq_only:
        write_bbq_run(run.out / label, *scores["bbq"], run.record(stage=label, wall_seconds=round(seconds, 1)))
        for key in ("stereoset", "crows"):
            if key in scores:
                write_jsonl(run.out / label / f"{key}_items.jsonl", scores[key][1])
    return scores


def save_mitigated(model: Any, run: Material, cfg: HeadRunConfig, folder: Path, strengths: torch.Tensor,
                   settings: HeadPruningConfig | None = None, **extra: Any) -> None:
    """``model`` (pruned by ``strengths``, recovered or not) saved to ``folder`` with what was pruned
    (``fairforget_mitigation.json``) and the method's config (``settings``, by default the run's own)."""
    pruning = {"base_model": cfg.model, "signal": cfg.signal, "select": cfg.select, "heads": hp.heads_of(strengths),
               "head_strengths": strengths.tolist(), "out_projection": run.layout.out_proj_name, **extra}
    save_model(model, run.loaded.tokenizer, folder, {
        MITIGATION_INFO: pruning,
        CONFIG_FILE: method_config("head_pruning", settings or typed_config(HeadPruningConfig, cfg))})


def evaluate_controls(run: Material, cfg: HeadRunConfig, choice: Choice) -> dict[str, dict]:
    """Scores of before, pruned (saved to ``<models_dir>/pruned/<model>``) and each random-heads draw."""
    scores = {"before": evaluate(run, "before", run.loaded.model)}
    with pruned(run.loaded.model, choice.strengths, run.layout):
        scores["pruned"] = evaluate(run, "pruned", run.loaded.model)
        save_mitigated(run.loaded.model, run, cfg, cfg.models_dir / "pruned" / run.name, choice.strengths)
    for d, strengths in enumerate(hp.random_draws(choice.strengths, cfg.seed, cfg.random_draws)):
        with pruned(run.loaded.model, strengths, run.layout):
            scores[f"random_{d}"] = evaluate(run, f"random_{d}", run.loaded.model)
    return scores


def randoms(scores: dict[str, dict], n: int) -> list[dict]:
    return [scores[f"random_{d}"] for d in range(n)]


def _bbq_point(scores: dict) -> dict:
    o = scores["bbq"][0]["overall"]
    return {k: o[k] for k in ("s_amb", "s_amb_ci", "acc_disambig", "acc_disambig_ci", "s_dis", "s_dis_ci")}


def dose_response(run: Material, cfg: HeadRunConfig, choice: Choice, scores: dict[str, dict]) -> list[dict]:
    """Held-out BBQ against the number of heads pruned (chosen vs random draws); writes dose_response.csv/.png.
    With ``settings_dir`` each k's pruned model (no recovery) is saved as ``<dir>/k_<k>``: a frontier."""
    dose, n_heads = [], run.layout.n_layers * run.layout.n_heads
    for k in [0, *sorted(set(cfg.dose_ks))]:
        if k > n_heads:
            print(f"dose-response: k={k} skipped (the model has {n_heads} heads)")
            continue
        chosen = hp.select_heads(choice.signal, "top-k", k, cfg.q, cfg.signed, cfg.strength)
        if k and cfg.settings_dir is not None:
            settings = dataclasses.replace(typed_config(HeadPruningConfig, cfg), select="top-k", k=k, recovery="none")
            with pruned(run.loaded.model, chosen, run.layout):
                save_mitigated(run.loaded.model, run, cfg, cfg.settings_dir / setting_name("k", k), chosen, settings)
        if k == 0:
            suite, draws = scores["before"], []
        elif torch.equal(chosen, choice.strengths) and cfg.dose_random_draws <= cfg.random_draws:
            suite, draws = scores["pruned"], randoms(scores, cfg.random_draws)[: cfg.dose_random_draws]
        else:
            with pruned(run.loaded.model, chosen, run.layout):
                suite = evaluate(run, f"k={k} chosen", run.loaded.model, bbq_only=True)
            draws = []
            for d, strengths in enumerate(hp.random_draws(chosen, cfg.seed, cfg.dose_random_draws)):
                with pruned(run.loaded.model, strengths, run.layout):
                    draws.append(evaluate(run, f"k={k} random {d}", run.loaded.model, bbq_only=True))
        entry = {"k": k, "chosen": _bbq_point(suite), "random": [_bbq_point(r) for r in draws]}
        if draws:
            entry["chosen_minus_random"] = {m: v for m, v in hc.versus_random(
                suite, draws, run.items, cfg.n_boot, cfg.seed).items() if m.startswith("bbq_")}
        dose.append(entry)
    write_csv(run.out / "dose_response.csv", [
        {"k": e["k"], "heads": kind, "draw": d, "s_amb": p["s_amb"], "acc_disambig": p["acc_disambig"],
         "s_dis": p["s_dis"]}
        for e in dose for kind, points in (("chosen", [e["chosen"]]), ("random", e["random"]))
        for d, p in enumerate(points)])
    hc.plot_dose_response(run.out / "dose_response.png", dose,
                          f"{run.name}: held-out BBQ vs heads pruned ({cfg.signal} signal, {cfg.mode} mode)")
    return dose


def recover(run: Material, cfg: HeadRunConfig, choice: Choice, scores: dict[str, dict]) -> tuple[dict, Any]:
    """Recovery fine-tuning of the pruned model (saved to ``<models_dir>/recovered/<model>``) and of the
    unpruned one (same data, steps, seed), each scored into ``scores``; returns (history, recovered model)."""
    orders, prompts = _prompts(run, cfg.seed)
    history, final = {}, run.loaded.model
    for label, strengths in (("recovered", choice.strengths), ("recovery_only", None)):
        model = copy.deepcopy(run.loaded.model)
        if strengths is not None:
            scale_heads(model, strengths)
        resume = Checkpointer(beside(cfg.models_dir / label / run.name, "resume"), cfg.checkpoint_every,
                              fingerprint=dict(config_to_dict(cfg), variant=label))
        with run.timed(f"train_{label}"):
            model, steps, lr = hp.recover(model, run.loaded.tokenizer, run.mitigation, orders, prompts, cfg.mode, cfg, resume)
        history[label] = {"steps": len(steps), "lr": lr, "first_loss": steps[0].loss, "last_loss": steps[-1].loss}
        write_csv(run.out / ("recovery_log.csv" if label == "recovered" else f"{label}_log.csv"),
                  [vars(h) for h in steps])
        if label == "recovered":
            save_mitigated(model, run, cfg, cfg.models_dir / "recovered" / run.name, choice.strengths,
                           recovery=cfg.recovery, recovery_lr=lr, recovery_examples=len(run.mitigation))
            final = model
        resume.clear()
        print(f"{label}: {cfg.recovery} recovery, {len(steps)} steps on {len(run.mitigation)} mitigation "
              f"examples (both conditions), loss {steps[0].loss:.3f} -> {steps[-1].loss:.3f}", flush=True)
        scores[label] = evaluate(run, label, model)
    return history, final


def localize(run: Material, cfg: HeadRunConfig, model: Any, examples: Sequence[Any], folder: Path, label: str,
             bbq_items: list[dict], compare_to: Path | None) -> None:
    """Localization of held-out prompts with ``model`` (the ``label`` variant, whose BBQ items give each
    prompt's answer type)."""
    with run.timed(f"localization_{label}"):
        run_localization(model, run.loaded.tokenizer, examples, folder, f"{run.name} ({label}, held-out scenarios)",
                         run.chat_tokenizer, cfg.seed, cfg.localize_batch_size,
                         run.record(stage=label, localized_model=f"{label} model of stage 22"), compare_to=compare_to,
                         answer_types={(it["category"], it["example_id"]): it["answer_type"] for it in bbq_items})


def write_summary(run: Material, cfg: HeadRunConfig, choice: Choice, scores: dict[str, dict], dose: list[dict],
                  history: dict, wall_seconds: float) -> None:
    """controls.md / controls.csv (every variant's row and paired change against before, chosen minus
    random heads) and metrics.json."""
    n = cfg.random_draws
    rows = {label: hc.summary_row(s, run.items, cfg.n_boot, cfg.seed) for label, s in scores.items()}
    changes = {label: hc.paired_row(scores["before"], s, run.items, run.suite) for label, s in scores.items()
               if label != "before"}
    vs_random = hc.versus_random(scores["pruned"], randoms(scores, n), run.items, cfg.n_boot, cfg.seed)
    shown = {**{k: rows[k] for k in ("before", "pruned")}, "random heads": [rows[f"random_{d}"] for d in range(n)],
             **{k: rows[k] for k in ("recovered", "recovery_only") if k in rows}}
    shown_changes = {"pruned": changes["pruned"], "random heads": [changes[f"random_{d}"] for d in range(n)],
                     **{k: changes[k] for k in ("recovered", "recovery_only") if k in changes}}
    count, total = int((choice.strengths > 0).sum()), float(choice.strengths.sum())
    heads = {k: f"{count} (sum of strengths {total:g})" for k in ("pruned", "random heads", "recovered")}
    table = hc.controls_markdown(shown, shown_changes, heads, vs_random)
    write_text(run.out / "controls.md", table)
    write_csv(run.out / "controls.csv", [dict(model=k, **{**rows[k], **changes.get(k, {})}) for k in rows])
    strengths = choice.strengths
    write_json(run.out / "metrics.json", {
        "model": cfg.model, "mode": cfg.mode, "permutations": cfg.permutations,
        "n_mitigation": len(run.mitigation), "n_held_out": len(run.held_out), "held_out_sets": run.items.sizes(),
        "n_recovery_examples": len(run.mitigation) if history else 0,
        "recovery_examples_by_condition": {c: sum(e.context_condition == c for e in run.mitigation)
                                           for c in ("ambig", "disambig")},
        "recovery": history, "signal": {"kind": choice.signal.kind, "n": choice.signal.n,
                                        "definition": choice.signal.definition},
        "select": cfg.select, "k": cfg.k, "q": cfg.q, "signed": cfg.signed, "heads_pruned": count,
        "heads_by_strength": {str(s): int((strengths == s).sum())
                              for s in sorted(set(strengths[strengths > 0].tolist()))},
        "heads": hp.heads_of(strengths), "protected": choice.protected, "rows": rows,
        "changes": changes, "chosen_minus_random": vs_random, "dose_response": dose,
        "wall_seconds": {k: round(v, 1) for k, v in {**run.timings, "total": wall_seconds}.items()},
        "provenance": run.provenance})
    print(table + f"total {wall_seconds:.0f} s -> {run.out}")


def final_model_folder(root: Path, flags: dict) -> Path:
    """Stage 22's final model under ``--models-dir root``: recovered, or pruned with ``--recovery none``."""
    return root / ("pruned" if flags.get("recovery") == "none" else "recovered") / model_name(flags["model"])


register_method(MethodSpec(
    name="head_pruning", title="attention-head soft-pruning with recovery fine-tuning", script="22_mitigate_heads.py",
    config=HeadPruningConfig, knobs=(Knob("k", "heads pruned"), Knob("strength", "each head scaled by 1 - strength")),
    zero_flags={"strength": 0.0, "recovery": "none"},
    saves_settings=True,
    sizes={"mitigation_per_category": 8, "eval_per_category": 8, "signal_limit": 60, "evals": ["bbq"],
           "random_draws": 2, "dose_ks": [20], "dose_random_draws": 0, "recovery_epochs": 1,
           "localize_per_category": 0},
    inputs=lambda layout: [layout.bbq, layout.stereoset],
    data_flags=lambda layout: {"data_dir": layout.bbq, "stereoset_path": layout.stereoset},
    output_flags=lambda spec, layout: {"models_dir": spec.root(layout), "out": spec.log_dir(layout)},
    output_folder=final_model_folder))
