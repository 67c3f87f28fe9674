"""Splitting BBQ examples by question template, so no template is both tuned on and evaluated on.

A BBQ template is (category, question_index): its examples share the question and the scenario and differ
only in names, groups, polarity and context condition. Splitting examples at random would leak templates
from the mitigation set into the held-out set.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Callable, Hashable, Sequence, TypeVar

from .errors import FairforgetError

T = TypeVar("T")


def template_key(example: Any) -> tuple[str, str]:
    """(category, question_index) of a BBQ example given as a dict or an object with those attributes."""
    get = example.get if isinstance(example, dict) else lambda name: getattr(example, name, None)
    category, index = get("category"), get("question_index")
    if category is None or index is None:
        raise FairforgetError(f"BBQ example {get('example_id')!r} lacks category or question_index")
    return (str(category), str(index))


def split_by_template(examples: Sequence[T], mitigation_fraction: float = 0.5, seed: int = 0,
                      key: Callable[[T], tuple[Hashable, Hashable]] = template_key) -> tuple[list[T], list[T]]:
    """(mitigation, held_out): per category, a seeded shuffle of its templates, the first share to mitigation.

    Each category with at least two templates gets at least one on each side. Input order is kept inside
    each side.
    """
    if not 0 < mitigation_fraction < 1:
        raise FairforgetError(f"--mitigation-fraction must lie strictly between 0 and 1, got {mitigation_fraction}")
    templates: dict[Hashable, set] = defaultdict(set)
    for example in examples:
        category, index = key(example)
        templates[category].add(index)
    mitigation_keys = set()
    for category in sorted(templates, key=str):
        ordered = sorted(templates[category], key=str)
        random.Random(f"{seed}:{category}").shuffle(ordered)
        n = len(ordered)
        take = min(max(round(mitigation_fraction * n), 1), n - 1) if n > 1 else n
        mitigation_keys.update((category, index) for index in ordered[:take])
    mitigation = [e for e in examples if key(e) in mitigation_keys]
    held_out = [e for e in examples if key(e) not in mitigation_keys]
    return mitigation, held_out
