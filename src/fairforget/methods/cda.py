"""Two-sided counterfactual data augmentation (CDA; Zmigrod et al. 2019, Webster et al. 2020, as in bias-bench).

Every training sentence is kept and joined by its counterfactual, the sentence with each gendered word
replaced by its counterpart from the WinoBias word lists (``generalized_swaps.txt``, ``extra_gendered_words.txt``,
one ``word<TAB>counterpart`` pair per line). The lists are read in both directions; where a word has several
counterparts the first listed pair wins (so ``her`` -> ``him``, from ``him her``, which precedes ``his her``:
a word list cannot tell the object from the possessive). Case is kept (``He`` -> ``She``, ``MEN`` -> ``WOMEN``);
words are matched whole, with a trailing period where the list has one (``mr.``).

:func:`within_token_budget` keeps (sentence, counterfactual) pairs in a seeded order while their tokens fit the
token budget of the plain fine-tune on the original sentences, so CDA trains on no more tokens than it (the damage
reference of :mod:`fairforget.methods.task_vector` budgets its neutral texts the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from fairforget.errors import FairforgetError
from fairforget.methods.lora import LoRATrainingConfig
from fairforget.methods.registry import Knob, MethodSpec, register_method

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?\.?")


def load_swaps(paths: Iterable[Path | str]) -> dict[str, str]:
    """Lower-case word -> counterpart from the lists, both directions, the first listed pair winning."""
    forward: list[tuple[str, str]] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FairforgetError(f"CDA word list not found: {path} (run scripts/00_fetch_data.py)")
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise FairforgetError(f"{path}:{line_no}: expected two words, got {line.strip()!r}")
            forward.append((parts[0].lower(), parts[1].lower()))
    swaps: dict[str, str] = {}
    for a, b in forward:
        swaps.setdefault(a, b)
    for a, b in forward:
        swaps.setdefault(b, a)
    if not swaps:
        raise FairforgetError("the CDA word lists are empty")
    return swaps


def _match_case(word: str, template: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_gender(text: str, swaps: dict[str, str]) -> str:
    """``text`` with every listed gendered word replaced by its counterpart (case kept)."""

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token.lower() in swaps:
            return _match_case(swaps[token.lower()], token)
        bare, dot = (token[:-1], ".") if token.endswith(".") else (token, "")
        if bare.lower() in swaps:
            return _match_case(swaps[bare.lower()], bare) + dot
        return token

    return WORD.sub(replace, text)


def augment(texts: Sequence[str], swaps: dict[str, str]) -> list[tuple[str, str]]:
    """(sentence, counterfactual) for each sentence; a sentence with no gendered word is its own counterpart."""
    return [(t, swap_gender(t, swaps)) for t in texts]


def within_token_budget(groups: Sequence[Sequence[str]], tokenizer: Any, budget: int, seed: int = 0) -> list[str]:
    """Every text of as many groups (pairs, or single texts; seeded order) as fit in ``budget`` tokens, as one
    list of training texts (a group that does not fit is skipped, a later shorter one may still fit)."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    texts, used = [], 0
    for i in order:
        cost = token_count(groups[i], tokenizer)
        if used + cost > budget:
            continue
        texts.extend(groups[i])
        used += cost
    if not texts:
        raise FairforgetError(f"no training text fits the token budget of {budget} tokens")
    return texts


def token_count(texts: Sequence[str], tokenizer: Any) -> int:
    """Tokens a fine-tune on ``texts`` reads: each text's own tokens plus its conditioning (BOS/EOS) token."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


@dataclass(frozen=True)
class CDAConfig(LoRATrainingConfig):
    """CDA's settings, saved next to its adapter: the LoRA fine-tune on the augmented pairs."""

    lora_dropout: float
    limit: int
    seed: int


register_method(MethodSpec(
    name="cda", title="CDA (Zmigrod et al. 2019; two-sided, WinoBias word lists)", script="31_cda.py",
    config=CDAConfig, knobs=(Knob("epochs", "training epochs at the plain fine-tune's token budget"),),
    zero_flags={"epochs": 0}, sizes={"epochs": 1}, saves_settings=True,
    inputs=lambda layout: [layout.pairs, *layout.swap_lists],
    data_flags=lambda layout: {"pairs": layout.pairs, "swap_lists": layout.swap_lists}))
