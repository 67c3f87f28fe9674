"""Scenario-safe splitting of BBQ, so no scenario is both tuned on and evaluated on.

A BBQ template is (category, question_index). The label and proper-name versions of one scenario carry
different indices but ask the same questions (Gender_identity 1 and 26), and some questions recur across
categories (Race_ethnicity and Race_x_gender). A *scenario* is a connected group of templates that share a
question string, negative or non-negative, across categories: splitting whole scenarios cannot put one
question on both sides. The scenario is also the cluster that BBQ intervals resample (:mod:`bbq_metrics`).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Any, Sequence, TypeVar

from fairforget.errors import FairforgetError

T = TypeVar("T")


def _get(example: Any, name: str) -> Any:
    return example.get(name) if isinstance(example, dict) else getattr(example, name, None)


def template_key(example: Any) -> tuple[str, int]:
    """(category, question_index) of a BBQ example given as a dict or an object with those attributes."""
    category, index = _get(example, "category"), _get(example, "question_index")
    if category is None or index is None:
        raise FairforgetError(f"BBQ example {_get(example, 'example_id')!r} lacks category or question_index")
    try:
        return (str(category), int(index))
    except (TypeError, ValueError):
        raise FairforgetError(f"BBQ example {_get(example, 'example_id')!r}: question_index {index!r} "
                              f"is not an integer") from None


def template_name(key: tuple[str, int]) -> str:
    return f"{key[0]}:{key[1]}"


def scenario_of_templates(examples: Sequence[Any]) -> dict[tuple[str, int], str]:
    """Each template's scenario id: the first template (by category, then index) of its connected group,
    templates being connected when they share a question string."""
    parent: dict[Any, Any] = {}

    def find(node: Any) -> Any:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for example in examples:
        key = template_key(example)
        question = _get(example, "question")
        root_a = find(("template", key))
        if question is not None:
            root_b = find(("question", str(question)))
            if root_a != root_b:
                parent[max(root_a, root_b)] = min(root_a, root_b)
    members: dict[Any, list[tuple[str, int]]] = defaultdict(list)
    for node in list(parent):
        if node[0] == "template":
            members[find(node)].append(node[1])
    return {key: template_name(min(keys)) for keys in members.values() for key in keys}


def _primary_category(keys: list[tuple[str, int]]) -> str:
    """The category with most templates in a scenario (ties: alphabetical)."""
    counts = Counter(category for category, _ in keys)
    return min(counts, key=lambda c: (-counts[c], c))


def split_by_scenario(examples: Sequence[T], mitigation_fraction: float = 0.5,
                      seed: int = 0) -> tuple[list[T], list[T]]:
    """(mitigation, held_out): whole scenarios to each side, per primary category a seeded shuffle of its
    scenarios with the first share to mitigation.

    Each category with at least two scenarios gets at least one on each side. Input order is kept inside
    each side. No question string appears on both sides.
    """
    if not 0 < mitigation_fraction < 1:
        raise FairforgetError(f"--mitigation-fraction must lie strictly between 0 and 1, got {mitigation_fraction}")
    scenario = scenario_of_templates(examples)
    templates: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, sid in scenario.items():
        templates[sid].append(key)
    by_category: dict[str, list[str]] = defaultdict(list)
    for sid, keys in templates.items():
        by_category[_primary_category(keys)].append(sid)
    mitigation_ids = set()
    for category in sorted(by_category):
        ordered = sorted(by_category[category])
        random.Random(f"{seed}:{category}").shuffle(ordered)
        n = len(ordered)
        take = min(max(round(mitigation_fraction * n), 1), n - 1) if n > 1 else n
        mitigation_ids.update(ordered[:take])
    mitigation = [e for e in examples if scenario[template_key(e)] in mitigation_ids]
    held_out = [e for e in examples if scenario[template_key(e)] not in mitigation_ids]
    return mitigation, held_out
