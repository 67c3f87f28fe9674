"""The score a method's setting is chosen by: |SS - 50| on a seeded sample of the StereoSet *selection* half.

The held-out half (``select_half(..., "heldout")``) is what the comparison reports; it is never used here.
With ``metric="gender"`` the sample is drawn from the gender examples of the selection half only, so a
small sample still holds enough gender examples to choose by. A setting's capability budget is its LMS drop
on the same examples and its perplexity increase on neutral texts of the *retain* half
(:func:`selection_texts`), never the held-out half that perplexity is reported on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from fairforget.artifacts import save_model
from fairforget.evals.perplexity import load_neutral_texts, perplexity
from fairforget.evals.stereoset import Example, evaluate_stereoset, load_stereoset, select_half, stratified_limit
from fairforget.methods.lora import save_adapter
from fairforget.methods.registry import save_method_config

Metric = Literal["overall", "gender"]


def selection_examples(path: Path | str, metric: Metric, limit: int | None, half_seed: int = 0,
                       seed: int = 0) -> list[Example]:
    """The selection-half examples a setting is chosen on (gender examples only for ``metric="gender"``)."""
    examples = select_half(load_stereoset(path), "selection", half_seed)
    if metric == "gender":
        examples = [e for e in examples if e.bias_type == "gender"]
    return stratified_limit(examples, limit, seed)


def selection_texts(limit: int | None) -> list[str]:
    """The neutral texts a setting's perplexity budget is measured on: the first ``limit`` of the retain half."""
    return load_neutral_texts("retain", limit)


def selection_score(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 32,
                    n_boot: int = 200, seed: int = 0, texts: Sequence[str] = ()) -> dict[str, Any]:
    """SS, its interval, LMS and |SS - 50| of ``model`` on the selection examples (all of them pooled), and its
    perplexity on ``texts`` when given."""
    metrics, _ = evaluate_stereoset(model, tokenizer, examples, batch_size, n_boot, seed)
    overall = metrics["overall"]["all"]
    row = {"ss": overall["ss"], "ss_ci": overall["ss_ci"], "lms": overall["lms"],
           "distance_from_50": abs(overall["ss"] - 50.0), "n_examples": len(examples)}
    return {**row, **budget_perplexity(model, tokenizer, texts, n_boot, seed)}


def budget_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], n_boot: int = 200,
                      seed: int = 0) -> dict[str, float]:
    """``{"perplexity": ...}`` of ``model`` on the budget ``texts`` (:func:`selection_texts`); empty without texts."""
    return {"perplexity": perplexity(model, tokenizer, texts, n_boot=n_boot, seed=seed)["perplexity"]} if texts else {}


def in_budget(row: dict, reference: dict, max_lms_drop: float | None, max_ppl_increase: float | None) -> bool:
    """Whether ``row`` loses at most ``max_lms_drop`` LMS points and at most ``max_ppl_increase`` percent
    perplexity against ``reference`` (None: that bound is off; rows without a perplexity skip its bound)."""
    lms_ok = max_lms_drop is None or reference["lms"] - row["lms"] <= max_lms_drop
    ppl_ok = (max_ppl_increase is None or "perplexity" not in row
              or 100 * (row["perplexity"] / reference["perplexity"] - 1) <= max_ppl_increase)
    return lms_ok and ppl_ok


def choose(rows: Sequence[dict], key: str, max_lms_drop: float | None, reference: dict,
           max_ppl_increase: float | None = None) -> dict:
    """The row with the smallest |SS - 50| within the capability budget against ``reference``
    (:func:`in_budget`; every row when none qualifies); ties keep the first row (``key`` order). A caller that
    may keep the start passes it among ``rows``, so that a budget nothing meets keeps the start."""
    allowed = [r for r in rows if in_budget(r, reference, max_lms_drop, max_ppl_increase)] or list(rows)
    return min(allowed, key=lambda r: (r["distance_from_50"], abs(r[key])))


def has_budget(cfg: Any) -> bool:
    """Whether ``cfg`` (a stage's :class:`SelectionFlags`) sets an LMS or a perplexity bound."""
    return cfg.max_lms_drop is not None or cfg.max_ppl_increase is not None


def choose_setting(rows: Sequence[dict], key: str, cfg: Any) -> dict:
    """A stage's choice among its settings (``rows[0]``: the start, strength 0) under its :class:`SelectionFlags`
    budget; the start is a candidate only when a budget is set (without one, the closest trained setting wins)."""
    return choose(rows if has_budget(cfg) else rows[1:], key, cfg.max_lms_drop, rows[0], cfg.max_ppl_increase)


def setting_name(knob: str, value: float) -> str:
    """A setting's folder name under --settings-dir (``lambda_0.5``), also recorded as the chosen setting."""
    return f"{knob}_{value:g}"


def save_setting(cfg: Any, model: Any, tokenizer: Any, value: float, setting: str, info: Any,
                 save: Callable[[Any, Any, Path, Any], Any] = save_model) -> None:
    """With --settings-dir (:class:`~fairforget.flags.SettingsFlags`), one setting's output as
    ``<settings_dir>/<setting>`` (``save``: how the stage saves its output, a model folder by default); strength 0
    is the start model (the method contract's zero setting) and is not saved again."""
    if cfg.settings_dir is not None and value != 0:
        save(model, tokenizer, Path(cfg.settings_dir) / setting, info)


def save_epoch_setting(cfg: Any, model: Any, tokenizer: Any, method: str, typed: Any, epoch: int) -> None:
    """With --settings-dir, a LoRA training method's adapter after ``epoch`` epochs as ``<dir>/epochs_<epoch>``
    (its typed config saying so): a frontier point along training, at no extra training."""
    def save(trained: Any, tok: Any, folder: Path, _: Any) -> None:
        save_adapter(trained, tok, folder, cfg.model)
        save_method_config(folder, method, dataclasses.replace(typed, epochs=epoch))

    save_setting(cfg, model, tokenizer, epoch, setting_name("epochs", epoch), None, save)


def budget_text(row: dict) -> str:
    """A selection row for the progress log: SS, LMS and (when measured) perplexity."""
    ppl = f" perplexity {row['perplexity']:.2f}" if "perplexity" in row else ""
    return f"SS {row['ss']:.2f} LMS {row['lms']:.2f}{ppl}"


def criterion(cfg: Any, n_examples: int, start: str) -> str:
    """The selection rule in words, for a method's record (``cfg``: a stage's :class:`SelectionFlags`)."""
    bounds = ([f"LMS at most {cfg.max_lms_drop} below {start}'s"] if cfg.max_lms_drop is not None else []) + (
        [f"perplexity at most {cfg.max_ppl_increase}% above {start}'s on {cfg.selection_ppl_texts} retain-half "
         f"neutral texts"] if cfg.max_ppl_increase is not None else [])
    rule = (f" with {' and '.join(bounds)} ({start} itself when no setting is in budget)" if bounds
            else f" ({start} excluded: no budget)")
    return f"smallest |SS - 50| ({cfg.selection_metric}) on {n_examples} selection-half StereoSet dev examples{rule}"
