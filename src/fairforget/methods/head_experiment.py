"""Stage 22's experiment: choose heads, evaluate every control on the same held-out items, write the run folder.

One :class:`Experiment` holds the split, the held-out sets, the chosen strengths and each evaluated
variant's suite; its methods run in the stage's order (choose_heads, evaluate_all_controls, dose_response,
recover, localize, write_summary), each writing its own files through ``fairforget.artifacts``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fairforget import plots
from fairforget.artifacts import save_model, sha256_text, write_csv, write_json, write_jsonl, write_text
from fairforget.provenance import provenance
from fairforget.evals.bbq import sample_per_category
from fairforget.evals.bbq_eval import PROMPT_TEMPLATE, QUESTION_ONLY_TEMPLATE, build_prompt, option_order, write_bbq_run
from fairforget.evals.bbq_split import split_by_scenario
from fairforget.checkpoint import Checkpointer
from fairforget.config import config_to_dict, typed_config
from fairforget.heads import head_layout, pruned, scale_heads
from fairforget.evals.localization import run_localization
from fairforget.evals.perplexity import texts_provenance
from fairforget.methods import head_controls as hc
from fairforget.methods import head_pruning as hp
from fairforget.methods.registry import CONFIG_FILE, Knob, MethodSpec, method_config, register_method
from fairforget.methods.selection import selection_examples
from fairforget.models import model_name
from fairforget.run_folders import beside


MITIGATION_INFO = "fairforget_mitigation.json"


def _bbq_point(suite: dict) -> dict:
    o = suite["bbq"][0]["overall"]
    return {k: o[k] for k in ("s_amb", "s_amb_ci", "acc_disambig", "acc_disambig_ci", "s_dis", "s_dis_ci")}


class Experiment:
    def __init__(self, cfg: Any, data: Any, loaded: Any, chat: bool, out: Path, name: str):
        self.cfg, self.data, self.loaded, self.out, self.name, self.chat = cfg, data, loaded, Path(out), name, chat
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.layout = head_layout(self.model)  # a clear error for models without heads, before any work
        self.chat_tok = self.tokenizer if chat else None
        mitigation_pool, held_pool = split_by_scenario(data.examples, cfg.mitigation_fraction, cfg.split_seed)
        self.mitigation = sample_per_category(mitigation_pool, cfg.mitigation_per_category, cfg.split_seed)
        self.held_out = sample_per_category(held_pool, cfg.eval_per_category, cfg.split_seed)
        self.sets = hc.held_out_sets(self.held_out, cfg)
        self.suites: dict[str, dict] = {}
        self.rows: dict[str, Any] = {}
        self.changes: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.final_model, self.dose, self.history = self.model, [], {}
        mitigation_scenarios = {e.scenario for e in self.mitigation}
        write_json(self.out / "split.json", {
            "split_seed": cfg.split_seed, "unit": "scenario", "mitigation_fraction": cfg.mitigation_fraction,
            "n_mitigation": len(self.mitigation), "n_held_out": len(self.held_out),
            "shared_scenarios": len(mitigation_scenarios & {e.scenario for e in self.held_out}),
            "mitigation_scenarios": sorted(mitigation_scenarios),
            "held_out_scenarios": sorted({e.scenario for e in self.held_out}), "held_out_sets": self.sets.sizes()})
        print(f"{len(self.mitigation)} mitigation / {len(self.held_out)} held-out BBQ examples (disjoint scenarios); "
              f"held-out sets {self.sets.sizes()}; {self.layout.n_layers} layers x {self.layout.n_heads} heads; "
              f"{loaded.source}", flush=True)

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        start = time.time()
        yield
        self.timings[key] = self.timings.get(key, 0.0) + time.time() - start

    def provenance(self, **extra: Any) -> dict:
        """As complete as stage 20's block, plus the held-out sets."""
        files = list(self.data.files) + [p for p, e in ((self.cfg.stereoset_path, "stereoset"),
                                                        (self.cfg.crows_path, "crows")) if e in self.cfg.evals]
        source = self.tokenizer.chat_template if self.chat else None
        return provenance(
            self.cfg, files, model_source=self.loaded.source, device=str(self.loaded.device),
            batch_size=self.cfg.batch_size, n_examples=len(self.held_out), held_out_sets=self.sets.sizes(),
            prompt_template=PROMPT_TEMPLATE, prompt_template_sha256=sha256_text(PROMPT_TEMPLATE),
            question_only_template_sha256=sha256_text(QUESTION_ONLY_TEMPLATE), chat_template=self.chat,
            chat_template_sha256=sha256_text(source) if source else None,
            scoring=(f"letter: p(letter)+p(' '+letter), renormalised over A/B/C, permutations {self.cfg.permutations}"
                     if self.cfg.mode == "letter" else "answer: per-token mean log-likelihood of ' '+answer text"),
            perplexity_texts=texts_provenance(self.sets.texts) if self.sets.texts else None, **extra)

    def choose_heads(self) -> None:
        cfg = self.cfg
        with self.timed("signal"):
            if cfg.signal == "stereoset":
                examples = selection_examples(cfg.stereoset_path, cfg.signal_domain, cfg.signal_limit, cfg.half_seed,
                                              cfg.seed)
                self.signal = hp.stereoset_signal(self.model, self.tokenizer, examples, cfg.batch_size)
            else:
                self.signal, act, orders = hp.bbq_signal(self.model, self.tokenizer, self.mitigation, cfg.mode,
                                                         self.chat_tok, cfg.seed, cfg.batch_size, cfg.activity)
                write_jsonl(self.out / "context_influence.jsonl", [
                    {"category": e.category, "example_id": e.example_id, "context_condition": e.context_condition,
                     "option_order": list(o), "p_full": pf, "p_question": pq, "context_influence": ci}
                    for e, o, pf, pq, ci in zip(self.mitigation, orders, act.p_full.tolist(), act.p_question.tolist(),
                                                act.influence.tolist())])
        self.strengths = hp.select_heads(self.signal, cfg.select, cfg.k, cfg.q, cfg.signed, cfg.strength)
        self.protected, cost = [], None
        if cfg.protect_top:
            orders = [option_order(e, cfg.seed) for e in self.mitigation]
            prompts = [build_prompt(e, o, True, self.chat_tok) for e, o in zip(self.mitigation, orders)]
            with self.timed("protection"):
                self.strengths, self.protected, cost = hp.protect(self.model, self.tokenizer, self.mitigation, prompts,
                                                                  orders, self.strengths, cfg)
        p_used = self.signal.pvalues(cfg.signed)
        write_csv(self.out / "head_signal.csv", [
            {"layer": l, "head": h, "score": float(self.signal.score[l, h]), "p_two_sided": float(self.signal.p_two_sided[l, h]),
             "p_used": float(p_used[l, h]), "strength": float(self.strengths[l, h]),
             "pruning_cost": None if cost is None else float(cost[l, h]), "protected": (l, h) in self.protected}
            for l in range(self.layout.n_layers) for h in range(self.layout.n_heads)])
        fig, axes = plots.new_figure(1, 2, figsize=(8, 7), sharey=True)
        bound = float(self.signal.score.abs().max()) or 1.0
        plots.layer_head_panel(fig, axes[0], self.signal.score.numpy(), f"{cfg.signal} signal", "RdBu_r", -bound, bound)
        plots.layer_head_panel(fig, axes[1], self.strengths.numpy(), "pruning strength", "Reds", 0, 1)
        axes[0].set_ylabel("layer")
        fig.suptitle(f"{self.name}: head signal (n={self.signal.n}) and chosen heads")
        plots.save_figure(fig, self.out / "head_signal.png")
        print(f"signal {cfg.signal} over {self.signal.n} examples: {int((p_used < 0.05).sum())} heads p < 0.05; "
              f"{cfg.select} chose {int((self.strengths > 0).sum())} heads at strength {cfg.strength} "
              f"({len(self.protected)} protected)", flush=True)

    def evaluate(self, label: str, model: Any, bbq_only: bool = False) -> dict:
        start = time.time()
        suite = hc.evaluate_suite(model, self.tokenizer, self.sets, self.cfg, bbq_only)
        seconds = time.time() - start
        self.timings["evaluations"] = self.timings.get("evaluations", 0.0) + seconds
        o = suite["bbq"][0]["overall"]
        print(f"[{label}] BBQ acc_dis {o['acc_disambig']:.3f} s_AMB {o['s_amb']:+.3f} s_DIS {o['s_dis']:+.3f}"
              + ("" if bbq_only else f" | {self._short(suite)}") + f" ({seconds:.0f} s)", flush=True)
        if bbq_only:
            return suite
        write_bbq_run(self.out / label, *suite["bbq"], self.provenance(stage=label, wall_seconds=round(seconds, 1)))
        for key in ("stereoset", "crows"):
            if key in suite:
                write_jsonl(self.out / label / f"{key}_items.jsonl", suite[key])
        self.suites[label] = suite
        self.rows[label] = hc.summary_row(suite, self.sets, self.cfg.n_boot, self.cfg.seed)
        if label != "before":
            self.changes[label] = hc.paired_row(self.suites["before"], suite, self.sets, self.cfg.n_boot, self.cfg.seed)
        return suite

    def _short(self, suite: dict) -> str:
        row = hc.summary_row(suite, self.sets, 1, 0)
        return " ".join(f"{k} {row[k]:.2f}" for k in ("ss_gender", "lms_gender", "ss_overall", "crows", "ppl") if k in row)

    def info(self, **extra: Any) -> dict:
        return {"base_model": self.cfg.model, "signal": self.cfg.signal, "select": self.cfg.select,
                "heads": hp.heads_of(self.strengths), "head_strengths": self.strengths.tolist(),
                "out_projection": self.layout.out_proj_name, **extra}

    def method_config(self) -> dict:
        return method_config("head_pruning", typed_config(HeadPruningConfig, self.cfg))

    def evaluate_all_controls(self) -> None:
        self.evaluate("before", self.model)
        with pruned(self.model, self.strengths, self.layout):
            self.evaluate("pruned", self.model)
            save_model(self.model, self.tokenizer, self.cfg.models_dir / "pruned" / self.name,
                       {MITIGATION_INFO: self.info(), CONFIG_FILE: self.method_config()})
        for d, strengths in enumerate(hp.random_draws(self.strengths, self.cfg.seed, self.cfg.random_draws)):
            with pruned(self.model, strengths, self.layout):
                self.evaluate(f"random_{d}", self.model)
        self.randoms = [self.suites[f"random_{d}"] for d in range(self.cfg.random_draws)]
        self.vs_random = hc.versus_random(self.suites["pruned"], self.randoms, self.sets, self.cfg.n_boot, self.cfg.seed)

    def dose_response(self) -> None:
        cfg, n_heads = self.cfg, self.layout.n_layers * self.layout.n_heads
        for k in [0, *sorted(set(cfg.dose_ks))]:
            if k > n_heads:
                print(f"dose-response: k={k} skipped (the model has {n_heads} heads)")
                continue
            chosen = hp.select_heads(self.signal, "top-k", k, cfg.q, cfg.signed, cfg.strength)
            if k == 0:
                suite, randoms = self.suites["before"], []
            elif torch.equal(chosen, self.strengths) and cfg.dose_random_draws <= cfg.random_draws:
                suite, randoms = self.suites["pruned"], self.randoms[: cfg.dose_random_draws]
            else:
                with pruned(self.model, chosen, self.layout):
                    suite = self.evaluate(f"k={k} chosen", self.model, bbq_only=True)
                randoms = []
                for d, strengths in enumerate(hp.random_draws(chosen, cfg.seed, cfg.dose_random_draws)):
                    with pruned(self.model, strengths, self.layout):
                        randoms.append(self.evaluate(f"k={k} random {d}", self.model, bbq_only=True))
            entry = {"k": k, "chosen": _bbq_point(suite), "random": [_bbq_point(r) for r in randoms]}
            if randoms:
                entry["chosen_minus_random"] = {m: v for m, v in hc.versus_random(
                    suite, randoms, self.sets, cfg.n_boot, cfg.seed).items() if m.startswith("bbq_")}
            self.dose.append(entry)
        write_csv(self.out / "dose_response.csv", [
            {"k": e["k"], "heads": kind, "draw": d, "s_amb": p["s_amb"], "acc_disambig": p["acc_disambig"],
             "s_dis": p["s_dis"]}
            for e in self.dose for kind, points in (("chosen", [e["chosen"]]), ("random", e["random"]))
            for d, p in enumerate(points)])
        hc.plot_dose_response(self.out / "dose_response.png", self.dose,
                              f"{self.name}: held-out BBQ vs heads pruned ({cfg.signal} signal, {cfg.mode} mode)")

    def recover(self) -> None:
        cfg = self.cfg
        orders = [option_order(e, cfg.seed) for e in self.mitigation]
        prompts = [build_prompt(e, o, True, self.chat_tok) for e, o in zip(self.mitigation, orders)]
        for label, strengths in (("recovered", self.strengths), ("recovery_only", None)):
            model = copy.deepcopy(self.model)
            if strengths is not None:
                scale_heads(model, strengths)
            resume = Checkpointer(beside(cfg.models_dir / label / self.name, "resume"), cfg.checkpoint_every,
                                  fingerprint=dict(config_to_dict(cfg), variant=label))
            with self.timed(f"train_{label}"):
                model, history, lr = hp.recover(model, self.tokenizer, self.mitigation, orders, prompts, cfg.mode, cfg,
                                                resume)
            self.history[label] = {"steps": len(history), "lr": lr, "first_loss": history[0].loss,
                                   "last_loss": history[-1].loss}
            write_csv(self.out / ("recovery_log.csv" if label == "recovered" else f"{label}_log.csv"),
                      [vars(h) for h in history])
            if label == "recovered":
                save_model(model, self.tokenizer, cfg.models_dir / "recovered" / self.name, {MITIGATION_INFO: self.info(
                    recovery=cfg.recovery, recovery_lr=lr, recovery_examples=len(self.mitigation)),
                    CONFIG_FILE: self.method_config()})
                self.final_model = model
            resume.clear()
            print(f"{label}: {cfg.recovery} recovery, {len(history)} steps on {len(self.mitigation)} mitigation "
                  f"examples (both conditions), loss {history[0].loss:.3f} -> {history[-1].loss:.3f}", flush=True)
            self.evaluate(label, model)

    def localize(self, model: Any, examples: Sequence[Any], folder: Path, label: str, compare_to: Path | None) -> None:
        items = self.suites[label]["bbq"][1]
        with self.timed(f"localization_{label}"):
            run_localization(model, self.tokenizer, examples, folder, f"{self.name} ({label}, held-out scenarios)",
                             self.chat_tok, self.cfg.seed, self.cfg.localize_batch_size,
                             self.provenance(stage=label, localized_model=f"{label} model of stage 22"),
                             compare_to=compare_to,
                             answer_types={(it["category"], it["example_id"]): it["answer_type"] for it in items})

    def write_summary(self, wall_seconds: float) -> None:
        cfg, n = self.cfg, self.cfg.random_draws
        rows = {k: v for k, v in self.rows.items() if not k.startswith("random_")}
        rows = {**{k: rows[k] for k in ("before", "pruned") if k in rows},
                "random heads": [self.rows[f"random_{d}"] for d in range(n)],
                **{k: rows[k] for k in ("recovered", "recovery_only") if k in rows}}
        changes = {"pruned": self.changes["pruned"], "random heads": [self.changes[f"random_{d}"] for d in range(n)],
                   **{k: self.changes[k] for k in ("recovered", "recovery_only") if k in self.changes}}
        count, total = int((self.strengths > 0).sum()), float(self.strengths.sum())
        heads = {k: f"{count} (sum of strengths {total:g})" for k in ("pruned", "random heads", "recovered")}
        table = hc.controls_markdown(rows, changes, heads, self.vs_random)
        write_text(self.out / "controls.md", table)
        write_csv(self.out / "controls.csv", [dict(model=k, **{**self.rows[k], **self.changes.get(k, {})})
                                              for k in self.rows])
        self.timings["total"] = wall_seconds
        write_json(self.out / "metrics.json", {
            "model": cfg.model, "mode": cfg.mode, "permutations": cfg.permutations,
            "n_mitigation": len(self.mitigation), "n_held_out": len(self.held_out), "held_out_sets": self.sets.sizes(),
            "n_recovery_examples": len(self.mitigation) if self.history else 0,
            "recovery_examples_by_condition": {c: sum(e.context_condition == c for e in self.mitigation)
                                               for c in ("ambig", "disambig")},
            "recovery": self.history, "signal": {"kind": self.signal.kind, "n": self.signal.n,
                                                 "definition": self.signal.definition},
            "select": cfg.select, "k": cfg.k, "q": cfg.q, "signed": cfg.signed, "heads_pruned": count,
            "heads_by_strength": {str(s): int((self.strengths == s).sum()) for s in sorted(set(self.strengths[self.strengths > 0].tolist()))},
            "heads": hp.heads_of(self.strengths), "protected": self.protected, "rows": self.rows,
            "changes": self.changes, "chosen_minus_random": self.vs_random, "dose_response": self.dose,
            "wall_seconds": {k: round(v, 1) for k, v in self.timings.items()}, "provenance": self.provenance()})
        print(table + f"total {wall_seconds:.0f} s -> {self.out}")


@dataclass(frozen=True)
class HeadPruningConfig:
    """Head pruning's settings (stage 22), saved next to the pruned and the recovered model."""

    model: str
    signal: str
    signal_domain: str
    signal_limit: int | None
    activity: str
    select: str
    k: int
    q: float
    signed: bool
    strength: float
    protect_top: int
    recovery: str
    recovery_epochs: int
    recovery_lr: float | None
    mitigation_fraction: float
    mitigation_per_category: int
    split_seed: int
    seed: int


def final_model_folder(root: Path, flags: dict) -> Path:
    """Stage 22's final model under ``--models-dir root``: recovered, or pruned with ``--recovery none``."""
    return root / ("pruned" if flags.get("recovery") == "none" else "recovered") / model_name(flags["model"])


register_method(MethodSpec(
    name="head_pruning", title="attention-head soft-pruning with recovery fine-tuning", script="22_mitigate_heads.py",
    config=HeadPruningConfig, knobs=(Knob("k", "heads pruned"), Knob("strength", "each head scaled by 1 - strength")),
    zero_flags={"strength": 0.0, "recovery": "none"},
    sizes={"mitigation_per_category": 8, "eval_per_category": 8, "signal_limit": 60, "evals": ["bbq"],
           "random_draws": 2, "dose_ks": [20], "dose_random_draws": 0, "recovery_epochs": 1,
           "localize_per_category": 0},
    inputs=lambda layout: [layout.bbq, layout.stereoset],
    data_flags=lambda layout: {"data_dir": layout.bbq, "stereoset_path": layout.stereoset},
    output_flags=lambda spec, layout: {"models_dir": spec.root(layout), "out": spec.log_dir(layout)},
    output_folder=final_model_folder))
