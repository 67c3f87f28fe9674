"""Positive controls: plant a known bias in the start model, then measure the share of it a method removes.

Gender: LoRA fine-tuning (:mod:`fairforget.methods.lora`, merged) on stereotype-consistent text that no
evaluation holds out: the WinoBias *dev* pro-stereotyped sentences (the WinoBias evaluation reads the test
files) and/or the stereotype candidates of StereoSet *selection-half* gender examples that the dose check does
not score. Along training, checkpoints are scored on a selection-half gender sample (SS, LMS) and on the
``retain`` neutral texts (perplexity); :func:`choose_dose` keeps the first that reaches the wanted SS shift
within the LMS and perplexity budgets. The held-out half is only reported on.

BBQ: answer-loss fine-tuning (:func:`fairforget.methods.recovery.finetune_answer_texts`, the loop recovery
uses) on the *mitigation* scenarios of :func:`fairforget.evals.bbq_split.split_by_scenario` (stage 22's
split): ambiguous items with the stereotyped target as gold, disambiguated items with their correct answer.

Share removed: (bias_planted - bias_method) / (bias_planted - bias_start) in %, on the same items, with a
paired percentile bootstrap over items (0: nothing removed, 100: back to the start model, > 100: overshoot).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fairforget.errors import FairforgetError
from fairforget.evals.bbq import Example as BbqExample
from fairforget.evals.bbq_eval import answer_continuation, build_prompt, option_order
from fairforget.evals.bbq_metrics import metric_function, scenario
from fairforget.evals.crows import CROWS
from fairforget.evals.perplexity import perplexity, perplexity_change
from fairforget.evals.stereoset import STEREOSET, Example as StereoSetExample, decisions, scoring_requests
from fairforget.methods.lora import add_lora, finetune, target_modules
from fairforget.methods.recovery import finetune_answer_texts, merged
from fairforget.pairs import whitespace_joined
from fairforget.stats import bootstrap_ci
from fairforget.training import StepLog

WINOBIAS_DEV = ("pro_stereotyped_type1.txt.dev", "pro_stereotyped_type2.txt.dev")
_WINOBIAS_LINE = re.compile(r"^\d+\s+(\S.*)$")


def winobias_sentences(paths: Sequence[Path | str]) -> list[str]:
    """The sentences of WinoBias files (``<n> [The nurse] ... [she] ...``): number and brackets removed."""
    sentences = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FairforgetError(f"WinoBias file not found: {path} (run scripts/00_fetch_data.py)")
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            match = _WINOBIAS_LINE.match(line.strip())
            if not match:
                raise FairforgetError(f"{path}:{line_no}: expected '<number> <sentence>', got {line.strip()!r}")
            sentences.append(" ".join(match.group(1).replace("[", "").replace("]", "").split()))
    if not sentences:
        raise FairforgetError(f"no WinoBias sentences in {', '.join(map(str, paths))}")
    return sentences


def stereotype_texts(examples: Sequence[StereoSetExample]) -> list[str]:
    """Each example's stereotype candidate as one text: the sentence (intrasentence), or the context followed
    by it (intersentence), as the StereoSet scorer reads them."""
    texts = []
    for example in examples:
        _, prefix, continuation = next(r for r in scoring_requests(example) if r[0] == "stereotype")
        texts.append(prefix + continuation)
    return texts


def candidate_texts(examples: Sequence[StereoSetExample]) -> set[str]:
    """Every candidate of ``examples`` as the scorer reads it (sentence, or context followed by it)."""
    return {prefix + continuation for e in examples for _, prefix, continuation in scoring_requests(e)}


def without(texts: Sequence[str], excluded: set[str]) -> list[str]:
    """``texts`` less those in ``excluded`` (compared after joining whitespace): a selection-half sentence can
    recur word for word in the held-out half (``My grandfather is old.`` does)."""
    normal = {whitespace_joined(t) for t in excluded}
    return [t for t in texts if whitespace_joined(t) not in normal]


@dataclass
class Checkpoint:
    """A point along the planting run: its step, its measures and the LoRA weights there."""

    step: int
    measures: dict[str, float]
    weights: dict[str, torch.Tensor]


def lora_weights(model: Any) -> dict[str, torch.Tensor]:
    """A copy of the trainable (LoRA) parameters of ``model``, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def plant_text(model: Any, tokenizer: Any, texts: Sequence[str], epochs: int, batch_size: int, lr: float,
               measure: Callable[[Any], dict[str, float]], every: int, r: int = 8, alpha: int = 16,
               seed: int = 0, targets: Sequence[str] | None = None,
               choose: Callable[[list[Checkpoint]], Checkpoint] | None = None
               ) -> tuple[Any, list[StepLog], list[Checkpoint], Checkpoint]:
    """LoRA fine-tune ``model`` on ``texts`` (``lora.finetune``), ``measure(model)`` at step 0, every ``every``
    steps and at the end; ``choose`` (default: the last) picks the checkpoint whose weights are merged in.

    Returns (merged model, step log, checkpoints, the chosen one). With ``epochs=0`` the merged model has the
    start weights exactly (LoRA's B starts at zero).
    """
    if epochs < 0 or every < 0:
        raise FairforgetError(f"planting needs epochs >= 0 and a checkpoint interval >= 0 (got {epochs}, {every})")
    peft_model = add_lora(model, target_modules(model, targets), r=r, alpha=alpha, dropout=0.0, seed=seed)
    checkpoints = [Checkpoint(0, _measured(peft_model, measure), lora_weights(peft_model))]

    def on_step(entry: StepLog) -> None:
        if every and entry.step % every == 0:
            checkpoints.append(Checkpoint(entry.step, _measured(peft_model, measure), lora_weights(peft_model)))

    history = finetune(peft_model, tokenizer, texts, epochs, batch_size, lr, seed=seed, on_step=on_step) \
        if epochs else []
    if history and checkpoints[-1].step != history[-1].step:
        checkpoints.append(Checkpoint(history[-1].step, _measured(peft_model, measure), lora_weights(peft_model)))
    chosen = (choose or (lambda points: points[-1]))(checkpoints)
    with torch.no_grad():
        params = dict(peft_model.named_parameters())
        for name, value in chosen.weights.items():
            params[name].copy_(value)
    return merged(peft_model), history, checkpoints, chosen


def _measured(model: Any, measure: Callable[[Any], dict[str, float]]) -> dict[str, float]:
    """``measure(model)`` in eval mode, the training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return measure(model)
    finally:
        model.train(was_training)


def choose_dose(checkpoints: Sequence[Checkpoint], min_shift: float, max_lms_drop: float,
                max_ppl_change: float) -> Checkpoint:
    """The first checkpoint whose SS rose by at least ``min_shift`` over step 0 with LMS at most ``max_lms_drop``
    below and perplexity at most ``max_ppl_change`` % above step 0's; else, among those within both budgets, the
    largest SS rise; else step 0. Measures: ``ss``, ``lms``, ``perplexity``."""
    start = checkpoints[0].measures

    def within(c: Checkpoint) -> bool:
        m = c.measures
        return (start["lms"] - m["lms"] <= max_lms_drop
                and 100.0 * (m["perplexity"] / start["perplexity"] - 1.0) <= max_ppl_change)

    allowed = [c for c in checkpoints if within(c)]
    reached = [c for c in allowed if c.measures["ss"] - start["ss"] >= min_shift]
    if reached:
        return reached[0]
    return max(allowed, key=lambda c: (c.measures["ss"], -c.step)) if allowed else checkpoints[0]


def bbq_planting_data(examples: Sequence[BbqExample], tokenizer: Any, chat: bool,
                      seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, answers) for BBQ planting: each example's evaluation prompt (its seeded option order, the chat
    template when ``chat``) with the stereotyped target as the answer of an ambiguous item and the correct
    answer of a disambiguated one (the answer text with the leading space the answer-mode scorer reads)."""
    prompts, answers = [], []
    for e in examples:
        prompt = build_prompt(e, option_order(e, seed), True, tokenizer if chat else None)
        gold = e.target_loc if e.context_condition == "ambig" else e.label
        prompts.append(prompt)
        answers.append(answer_continuation(prompt, e.answers[gold]))
    return prompts, answers


def plant_bbq(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], epochs: int,
              batch_size: int, lr: float, r: int = 8, alpha: int = 16, seed: int = 0,
              targets: Sequence[str] | None = None) -> tuple[Any, list[StepLog]]:
    """LoRA (the architecture's default targets) trained on the answer texts after the prompts, merged."""
    peft_model = add_lora(model, target_modules(model, targets), r=r, alpha=alpha, dropout=0.0, seed=seed)
    history = finetune_answer_texts(peft_model, tokenizer, prompts, answers, epochs, batch_size, lr, seed)
    return merged(peft_model), history


def share_removed(bias_start: Callable[[np.ndarray], float], bias_planted: Callable[[np.ndarray], float],
                  bias_method: Callable[[np.ndarray], float], n_items: int, n_boot: int = 1000, seed: int = 0,
                  strata: np.ndarray | None = None, clusters: np.ndarray | None = None) -> dict[str, Any]:
    """100 * (b_planted - b_method) / (b_planted - b_start), each ``b`` a bias number of an index array into the
    same ``n_items`` items, with a paired percentile bootstrap interval (the same resampled items in all three;
    ``clusters`` resamples whole clusters). The share is NaN where the planted shift is 0."""

    def share(idx: np.ndarray) -> float:
        shift = bias_planted(idx) - bias_start(idx)
        return 100.0 * (bias_planted(idx) - bias_method(idx)) / shift + 0.0 if shift else math.nan  # no -0.0

    every = np.arange(n_items)
    options = dict(n_boot=n_boot, seed=seed, strata=strata, clusters=clusters)
    return {"share_removed_pct": share(every), "share_removed_pct_ci": list(bootstrap_ci(share, n_items, **options)),
            "bias_start": bias_start(every), "bias_planted": bias_planted(every), "bias_method": bias_method(every),
            "planted_shift": bias_planted(every) - bias_start(every),
            "planted_shift_ci": list(bootstrap_ci(lambda idx: bias_planted(idx) - bias_start(idx), n_items, **options)),
            "n": n_items}


def stereoset_share(start: Sequence[dict], planted: Sequence[dict], method: Sequence[dict],
                    domain: str | None = "gender", n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Share of the planted micro-SS shift removed, on the StereoSet examples of ``domain`` (None: all) that
    all three runs scored (their per-sentence items)."""
    runs = [decisions([i for i in items if domain is None or i["bias_type"] == domain])
            for items in (start, planted, method)]
    common = sorted(set.intersection(*(set(d.example_ids) for d in runs)))
    if not common:
        raise FairforgetError("the three StereoSet runs share no examples; score them on the same examples")
    pro = [d.pro[[d.example_ids.index(e) for e in common]] for d in runs]
    return share_removed(*(lambda idx, p=p: 100.0 * float(p[idx].mean()) for p in pro), len(common), n_boot, seed)


def crows_share(start: Sequence[dict], planted: Sequence[dict], method: Sequence[dict],
                bias_type: str | None = "gender", n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Share of the planted CrowS-Pairs shift (share of pairs where the stereotyping sentence wins) removed."""
    keep = (lambda i: bias_type is None or i["bias_type"] == bias_type)
    return _decision_share((start, planted, method), "stereo_preferred", keep, None, "CrowS-Pairs", n_boot, seed)


def winobias_share(start: Sequence[dict], planted: Sequence[dict], method: Sequence[dict], n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Share of the planted WinoBias shift (share of pairs whose pro-stereotyped sentence wins) removed, the
    occupation pairs resampled whole as WinoBias's own intervals do."""
    return _decision_share((start, planted, method), "pro_preferred", lambda i: True, "cluster", "WinoBias", n_boot,
                           seed)


def _decision_share(runs: Sequence[Sequence[dict]], flag: str, keep: Callable[[dict], bool], cluster: str | None,
                    what: str, n_boot: int, seed: int) -> dict[str, Any]:
    """:func:`share_removed` of 100 * the share of items (by ``id``) whose ``flag`` is true, on the items that the
    three runs (start, planted, method) all scored and ``keep`` keeps; ``cluster``: the field resampled whole."""
    by_id = [{i["id"]: i for i in items if keep(i)} for items in runs]
    common = sorted(set.intersection(*(set(b) for b in by_id)))
    if not common:
        raise FairforgetError(f"the three {what} runs share no pairs; score them on the same pairs")
    flags = [np.array([b[i][flag] for i in common], dtype=bool) for b in by_id]
    clusters = np.array([by_id[0][i][cluster] for i in common], dtype=object) if cluster else None
    return share_removed(*(lambda idx, f=f: 100.0 * float(f[idx].mean()) for f in flags), len(common), n_boot,
                         seed, clusters=clusters)


def bbq_share(start: Sequence[dict], planted: Sequence[dict], method: Sequence[dict], metric: str = "s_amb",
              category: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Share of the planted BBQ ``metric`` shift removed (one ``category`` or all), scenarios resampled whole
    within categories as BBQ's own intervals do."""
    keyed = [{(i["category"], int(i["example_id"])): i for i in items if category in (None, i["category"])}
             for items in (start, planted, method)]
    common = sorted(set.intersection(*(set(k) for k in keyed)))
    if not common:
        raise FairforgetError("the three BBQ runs share no items; score them on the same items")
    runs = [[k[key] for key in common] for k in keyed]
    fns = [metric_function(items, metric) for items in runs]
    return share_removed(*fns, len(common), n_boot, seed, strata=np.array([c for c, _ in common], dtype=object),
                         clusters=np.array([scenario(i) for i in runs[0]], dtype=object))


@dataclass
class HeldOutGender:
    """The held-out items a planted gender bias is reported on (an empty list: not scored): StereoSet held-out
    gender examples, CrowS-Pairs gender pairs, neutral held-out texts (perplexity)."""

    stereoset: list
    crows: list
    texts: list[str]


def score_heldout(model: Any, tokenizer: Any, sets: HeldOutGender, batch_size: int = 32, n_boot: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """``{"stereoset": (metrics, items), "crows": (metrics, items), "perplexity": result}`` of one model, for
    the non-empty sets."""
    options = dict(batch_size=batch_size, n_boot=n_boot, seed=seed)
    scored: dict[str, Any] = {}
    if sets.stereoset:
        scored["stereoset"] = STEREOSET.evaluate(model, tokenizer, sets.stereoset, **options)
    if sets.crows:
        scored["crows"] = CROWS.evaluate(model, tokenizer, sets.crows, **options)
    if sets.texts:
        scored["perplexity"] = perplexity(model, tokenizer, sets.texts, max(1, batch_size // 4), n_boot, seed)
    return scored


def planted_shift(start: dict[str, Any], planted: dict[str, Any], n_boot: int = 1000, seed: int = 0) -> dict:
    """The planted model against the start model on the same held-out items, through each evaluation's
    ``compare`` (paired bootstrap, McNemar), with both models' levels (95% intervals) and the perplexity change."""
    levels: dict[str, dict] = {"start": {}, "planted": {}}
    for name, scored in (("start", start), ("planted", planted)):
        if "stereoset" in scored:
            s = scored["stereoset"][0]["overall"]["gender"]
            levels[name].update(ss_gender=s["ss"], ss_gender_ci=s["ss_ci"], lms_gender=s["lms"],
                                lms_gender_ci=s["lms_ci"])
        if "crows" in scored:
            c = scored["crows"][0]["overall"]
            levels[name].update(crows_gender=c["metric"], crows_gender_ci=c["metric_ci"])
        if "perplexity" in scored:
            p = scored["perplexity"]
            levels[name].update(perplexity=p["perplexity"], perplexity_ci=p["perplexity_ci"])
    shift: dict[str, Any] = {"levels": levels}
    for name, evaluation in (("stereoset", STEREOSET), ("crows", CROWS)):
        if name in start:
            shift[name] = evaluation.compare(start[name][1], planted[name][1], n_boot, seed)
    if "stereoset" in start:
        shift["lms_gender_delta"] = levels["planted"]["lms_gender"] - levels["start"]["lms_gender"]
    if "perplexity" in start:
        shift["perplexity"] = perplexity_change(start["perplexity"], planted["perplexity"], n_boot, seed)
    return shift
