"""Pair sources beyond WinoGender's own sentences, and balancing the two orientations.

``group_first_pairs`` builds attribute contrasts read group-first, as StereoSet's candidates are
("She is a nurse." / "He is a nurse."), from the 60 WinoGender occupations and their statistics: for each
occupation, template and (male, female) group term, the side whose gender is the occupation's majority
(share of women below 50: male) is advantaged.

``stereoset_pairs`` is the in-domain source (issue 25's ``stereoset_selection``): the stereotype (advantaged)
and anti-stereotype (disadvantaged) candidate of StereoSet examples of the *selection* half, as the scorer reads
them, for methods that train on the benchmark's own format as BiasUnlearn's code does. Its caller passes the
held-out half's candidates and the selection sample the methods choose on, and no pair holding one of them is kept.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal, Sequence

from fairforget.errors import FairforgetError
from fairforget.evals.stereoset import Example, scoring_requests
from fairforget.winogender import Pair, Statistic, load_occupation_stats

PAIR_SOURCES = ("winogender", "group_first", "winobias", "stereoset_selection")  # stage 10's --sources

GROUP_TERMS = (("He", "She"), ("The man", "The woman"), ("My father", "My mother"), ("My brother", "My sister"))
GROUP_FIRST_TEMPLATES = ("{group} is {article} {occupation}.", "{group} works as {article} {occupation}.")
Balance = Literal["none", "downsample", "upsample"]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def group_first_pairs(stats_path: Path | str, stat: Statistic = "bergsma",
                      templates: Sequence[str] = GROUP_FIRST_TEMPLATES,
                      terms: Sequence[tuple[str, str]] = GROUP_TERMS) -> list[Pair]:
    """One pair per occupation, template and (male, female) group term, oriented by the occupation statistic."""
    if not templates or not terms:
        raise FairforgetError("group-first pairs need at least one template and one pair of group terms")
    pairs = []
    for occupation, pct in sorted(load_occupation_stats(stats_path, stat).items()):
        for t_index, template in enumerate(templates):
            for male, female in terms:
                text = {g: template.format(group=term, article=_article(occupation), occupation=occupation)
                        for g, term in (("male", male), ("female", female))}
                adv = "male" if pct < 50 else "female"
                dis = "female" if adv == "male" else "male"
                pairs.append(Pair(f"gf-{occupation}-{t_index}-{male.lower().replace(' ', '_')}", occupation,
                                  template, text[adv], text[dis], adv, pct, f"group-first-{stat}"))
    return pairs


def whitespace_joined(text: str) -> str:
    """``text`` with every run of whitespace as one space: how a recurring sentence is recognised."""
    return " ".join(text.split())


def stereoset_pairs(examples: Sequence[Example], excluded: Iterable[str]) -> list[Pair]:
    """(stereotype, anti-stereotype) candidate of each example as one pair (the context before an intersentence
    candidate, as the scorer reads it); a pair whose either text recurs in ``excluded`` (whitespace joined) is
    dropped: a selection-half sentence can recur word for word in the held-out half."""
    normal = {whitespace_joined(text) for text in excluded}
    pairs = []
    for example in examples:
        text = {label: prefix + continuation for label, prefix, continuation in scoring_requests(example)}
        if {whitespace_joined(text[label]) for label in ("stereotype", "anti-stereotype")} & normal:
            continue
        pairs.append(Pair(pair_id=f"stereoset-{example.id}", occupation=example.target, template=example.split,
                          advantaged=text["stereotype"], disadvantaged=text["anti-stereotype"],
                          adv_gender="stereotype", pct_female=None, source=f"stereoset-selection-{example.bias_type}"))
    return pairs


def orientation_counts(pairs: Sequence[Pair]) -> dict[str, int]:
    """Pairs per source and advantaged gender, e.g. ``{"winogender-bergsma:male": 196, ...}``."""
    return dict(sorted(Counter(f"{p.source}:{p.adv_gender}" for p in pairs).items()))


def balance_pairs(pairs: Sequence[Pair], mode: Balance = "none", seed: int = 0) -> list[Pair]:
    """As many male- as female-advantaged pairs within each source: ``downsample`` draws the larger side down
    to the smaller one's count, ``upsample`` repeats the smaller side (seeded draws, cycling whole copies
    first); pairs of any other orientation are kept as they are. Order: by source, then as drawn."""
    if mode not in ("none", "downsample", "upsample"):
        raise FairforgetError(f"unknown balance {mode!r}: use none, downsample or upsample")
    if mode == "none":
        return list(pairs)
    rng = random.Random(seed)
    out: list[Pair] = []
    for source in sorted({p.source for p in pairs}):
        group = [p for p in pairs if p.source == source]
        male = [p for p in group if p.adv_gender == "male"]
        female = [p for p in group if p.adv_gender == "female"]
        other = [p for p in group if p.adv_gender not in ("male", "female")]
        if not male or not female:
            raise FairforgetError(f"source {source} has {len(male)} male- and {len(female)} female-advantaged "
                                  f"pairs: cannot balance an orientation that is absent")
        small, large = sorted((male, female), key=len)
        if mode == "downsample":
            large = rng.sample(large, len(small))
        else:
            copies, rest = divmod(len(large), len(small))
            small = small * copies + rng.sample(small, rest)
        out.extend(sorted(small + large, key=lambda p: p.pair_id) + other)
    return out
