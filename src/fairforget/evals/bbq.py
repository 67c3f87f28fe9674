"""BBQ (Parrish et al. 2022): loading with the ``target_loc`` join and stratified sampling.

Each example is joined on (category, example_id) with ``supplemental/additional_metadata.csv`` for
``target_loc``, the index of the answer naming the stereotyped group. Keys listed twice with the same
``target_loc`` are kept once (64 Gender_identity keys in the released file); examples whose ``target_loc``
is NA (16) are excluded and counted. The released ``target_loc`` is already polarity-corrected (upstream
``BBQ_results_metadata.R`` rewrites it for non-negative questions), so the biased answer is ``target_loc`` for
both polarities. Each example also carries its scenario (:mod:`fairforget.evals.bbq_split`), the unit that splits
and intervals respect. Prompts, evaluation and the run folder are in :mod:`fairforget.evals.bbq_eval`; metrics
in :mod:`fairforget.evals.bbq_metrics`.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from fairforget.evals.bbq_split import scenario_of_templates, template_key
from fairforget.errors import FairforgetError

CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
              "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")
BBQ_GENDER = "Gender_identity"  # the category the gender measures of the held-out suite read
CONDITIONS = ("ambig", "disambig")
POLARITIES = ("neg", "nonneg")
METADATA_FILE = Path("supplemental") / "additional_metadata.csv"
_REQUIRED = ("example_id", "question_index", "question_polarity", "context_condition", "category",
             "answer_info", "context", "question", "ans0", "ans1", "ans2", "label")


@dataclass(frozen=True)
class Example:
    """One BBQ item with its answers in the original order (ans0, ans1, ans2) and the metadata join."""

    category: str
    example_id: int
    question_index: int
    question_polarity: str
    context_condition: str
    context: str
    question: str
    answers: tuple[str, ...]
    groups: tuple[str, ...]
    label: int
    target_loc: int
    unknown_loc: int
    scenario: str = ""

    @property
    def biased_loc(self) -> int:
        """The answer a stereotype-following model gives: ``target_loc``, for both polarities (the released
        metadata already points non-negative questions at the non-target group)."""
        return self.target_loc

    @property
    def stratum(self) -> str:
        return f"{self.category}|{self.context_condition}|{self.question_polarity}"


@dataclass
class BbqData:
    """Loaded examples and what the metadata join dropped, per category."""

    examples: list[Example]
    excluded_na: dict[str, int]
    duplicate_metadata_keys: dict[str, int]
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Meta:
    question_index: int
    target_loc: int | None
    line: int


def _category_list(categories: Sequence[str] | None, where: str) -> list[str]:
    chosen = list(categories) if categories else list(CATEGORIES)
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        raise FairforgetError(f"{where}: unknown BBQ categor{'y' if len(unknown) == 1 else 'ies'} "
                              f"{', '.join(unknown)}; known: {', '.join(CATEGORIES)}")
    return list(dict.fromkeys(chosen))


def _int(value: Any, path: Path, line: int, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FairforgetError(f"{path}:{line}: {name} {value!r} is not an integer") from None


def load_target_locs(path: Path, categories: Sequence[str]) -> tuple[dict[tuple[str, int], _Meta], Counter]:
    """``target_loc`` per (category, example_id) of the wanted categories (None where NA), and how many
    duplicate keys (same ``target_loc``) were dropped per category."""
    if not path.is_file():
        raise FairforgetError(f"BBQ metadata file not found: {path}")
    wanted = set(categories)
    table: dict[tuple[str, int], _Meta] = {}
    duplicates: Counter = Counter()
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        needed = ("category", "question_index", "example_id", "target_loc")
        if header is None or any(name not in header for name in needed):
            raise FairforgetError(f"{path}:1: header must have the columns {', '.join(needed)}, got {header}")
        col = {name: header.index(name) for name in needed}
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if len(row) != len(header):
                raise FairforgetError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
            category = row[col["category"]]
            if category not in CATEGORIES:
                raise FairforgetError(f"{path}:{line}: unknown category {category!r}")
            if category not in wanted:
                continue
            key = (category, _int(row[col["example_id"]], path, line, "example_id"))
            raw = row[col["target_loc"]].strip()
            target = None if raw in ("NA", "") else _int(raw, path, line, "target_loc")
            if target is not None and target not in (0, 1, 2):
                raise FairforgetError(f"{path}:{line}: target_loc {target} is not 0, 1 or 2")
            meta = _Meta(_int(row[col["question_index"]], path, line, "question_index"), target, line)
            if key in table:
                if table[key].target_loc != target:
                    raise FairforgetError(f"{path}:{line}: {key} repeats line {table[key].line} with a different "
                                          f"target_loc ({target} vs {table[key].target_loc})")
                duplicates[category] += 1
                continue
            table[key] = meta
    return table, duplicates


def _parse_example(record: Any, path: Path, line: int, category: str,
                   metadata: dict[tuple[str, int], _Meta]) -> Example | None:
    """One JSONL record as an Example; None when its target_loc is NA."""
    where = f"{path}:{line}"
    if not isinstance(record, dict):
        raise FairforgetError(f"{where}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise FairforgetError(f"{where}: missing field(s) {', '.join(missing)}")
    if record["category"] not in CATEGORIES:
        raise FairforgetError(f"{where}: unknown category {record['category']!r}")
    if record["category"] != category:
        raise FairforgetError(f"{where}: category {record['category']!r} in the file of {category}")
    if record["question_polarity"] not in POLARITIES or record["context_condition"] not in CONDITIONS:
        raise FairforgetError(f"{where}: bad question_polarity/context_condition "
                              f"{record['question_polarity']!r}/{record['context_condition']!r}")
    info = record["answer_info"]
    try:
        groups = tuple(str(info[f"ans{i}"][1]) for i in range(3))
    except (TypeError, KeyError, IndexError):
        raise FairforgetError(f"{where}: answer_info must map ans0..ans2 to [text, group]") from None
    unknown = [i for i, g in enumerate(groups) if g == "unknown"]
    if len(unknown) != 1:
        raise FairforgetError(f"{where}: expected exactly one answer of group 'unknown', got groups {groups}")
    label = _int(record["label"], path, line, "label")
    if label not in (0, 1, 2):
        raise FairforgetError(f"{where}: label {label} is not 0, 1 or 2")
    example_id = _int(record["example_id"], path, line, "example_id")
    question_index = _int(record["question_index"], path, line, "question_index")
    meta = metadata.get((category, example_id))
    if meta is None:
        raise FairforgetError(f"{where}: ({category}, {example_id}) has no row in {METADATA_FILE}")
    if meta.question_index != question_index:
        raise FairforgetError(f"{where}: question_index {question_index} disagrees with {METADATA_FILE} "
                              f"line {meta.line} ({meta.question_index})")
    if meta.target_loc is None:
        return None
    if meta.target_loc == unknown[0]:
        raise FairforgetError(f"{where}: target_loc {meta.target_loc} (metadata line {meta.line}) is the unknown answer")
    return Example(category, example_id, question_index, record["question_polarity"], record["context_condition"],
                   str(record["context"]), str(record["question"]),
                   tuple(str(record[f"ans{i}"]) for i in range(3)), groups, label, meta.target_loc, unknown[0])


def load_bbq(data_dir: Path | str, categories: Sequence[str] | None = None) -> BbqData:
    """Read ``data/<Category>.jsonl`` of the chosen categories (all by default) joined with target_loc."""
    data_dir = Path(data_dir)
    chosen = _category_list(categories, "categories")
    metadata_path = data_dir / METADATA_FILE
    metadata, duplicates = load_target_locs(metadata_path, chosen)
    examples: list[Example] = []
    excluded: Counter = Counter()
    files = [metadata_path]
    for category in chosen:
        path = data_dir / "data" / f"{category}.jsonl"
        if not path.is_file():
            raise FairforgetError(f"BBQ file not found: {path}")
        files.append(path)
        with open(path) as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise FairforgetError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
                example = _parse_example(record, path, line, category, metadata)
                if example is None:
                    excluded[category] += 1
                else:
                    examples.append(example)
    scenario = scenario_of_templates(examples)
    examples = [replace(e, scenario=scenario[template_key(e)]) for e in examples]
    return BbqData(examples, {c: excluded[c] for c in chosen}, {c: duplicates[c] for c in chosen}, files)


def sample_per_category(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """Up to ``n`` examples per category, stratified over ambig/disambig x neg/nonneg (n/4 each, the
    remainder to the first cells in that order); ``None`` keeps all. Output keeps the input order."""
    if n is None:
        return list(examples)
    if n < 1:
        raise FairforgetError(f"--per-category must be at least 1, got {n}")
    rng = random.Random(seed)
    cells: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        cells.setdefault(example.stratum, []).append(i)
    keep: list[int] = []
    for category in dict.fromkeys(e.category for e in examples):
        names = [f"{category}|{c}|{p}" for c in CONDITIONS for p in POLARITIES]
        for k, name in enumerate(names):
            quota = n // len(names) + (1 if k < n % len(names) else 0)
            pool = cells.get(name, [])
            keep += rng.sample(pool, min(quota, len(pool)))
    return [examples[i] for i in sorted(keep)]
