"""Contrastive sentence pairs (advantaged, disadvantaged) from WinoGender and WinoBias.

WinoGender gives, per occupation, participant and template, a male, a female and a neutral sentence. The
occupation statistic (Bergsma or BLS share of women) decides which side is advantaged: below 50% women,
the male sentence is advantaged and the female one disadvantaged; otherwise the reverse. WinoBias gives
pro- and anti-stereotyped versions of the same sentence; the pro-stereotyped one is advantaged.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Literal

from fairforget.datasets import read_table
from fairforget.artifacts import atomic_path
from fairforget.errors import FairforgetError

Statistic = Literal["bergsma", "bls"]
PAIR_COLUMNS = ("pair_id", "occupation", "template", "advantaged", "disadvantaged", "adv_gender", "pct_female",
                "source")
_SENTID = re.compile(r"^(?P<occupation>[^.]+)\.(?P<participant>[^.]+)\.(?P<answer>[01])\.(?P<gender>male|female|"
                     r"neutral)\.txt$")
_WINOBIAS_LINE = re.compile(r"^(?P<num>\d+)\s+(?P<text>.+)$")


@dataclass(frozen=True)
class Pair:
    """Two sentences that differ only in the group term; training lowers ``advantaged`` relative to the other."""

    pair_id: str
    occupation: str
    template: str
    advantaged: str
    disadvantaged: str
    adv_gender: str
    pct_female: float | None
    source: str


def _read_tsv(path: Path, required: Iterable[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a tab-separated file with a header, each with its 1-based line number (a row with another number
    of columns than the header is an error naming the line)."""
    return read_table(path, required, delimiter="\t")


def load_occupation_stats(path: Path | str, stat: Statistic = "bergsma") -> dict[str, float]:
    """Share of women (0-100) per occupation from ``occupations-stats.tsv``."""
    if stat not in ("bergsma", "bls"):
        raise FairforgetError(f"unknown statistic {stat!r}: use bergsma or bls")
    column = f"{stat}_pct_female"
    stats: dict[str, float] = {}
    for line, row in _read_tsv(Path(path), ["occupation", column]):
        try:
            value = float(row[column])
        except (TypeError, ValueError) as exc:
            raise FairforgetError(f"{path}:{line}: {column} is not a number: {row[column]!r}") from exc
        if not 0 <= value <= 100:
            raise FairforgetError(f"{path}:{line}: {column} {value} is outside 0..100")
        stats[row["occupation"]] = value
    return stats


def load_winogender_pairs(sentences_path: Path | str, stats_path: Path | str,
                          stat: Statistic = "bergsma") -> list[Pair]:
    """One pair per (occupation, participant, answer) template: the male and female sentences, oriented."""
    stats = load_occupation_stats(stats_path, stat)
    by_template: dict[str, dict[str, str]] = {}
    occupation_of: dict[str, str] = {}
    for line, row in _read_tsv(Path(sentences_path), ["sentid", "sentence"]):
        match = _SENTID.match(row["sentid"] or "")
        if not match or not (row["sentence"] or "").strip():
            raise FairforgetError(f"{sentences_path}:{line}: malformed row {row['sentid']!r}")
        template = f"{match['occupation']}.{match['participant']}.{match['answer']}"
        by_template.setdefault(template, {})[match["gender"]] = row["sentence"].strip()
        occupation_of[template] = match["occupation"]
    pairs = []
    for template, sentences in by_template.items():
        occupation = occupation_of[template]
        if "male" not in sentences or "female" not in sentences:
            raise FairforgetError(f"{sentences_path}: template {template} lacks a male or a female sentence")
        if occupation not in stats:
            raise FairforgetError(f"{stats_path}: no statistic for occupation {occupation!r}")
        pct = stats[occupation]
        adv = "male" if pct < 50 else "female"
        dis = "female" if adv == "male" else "male"
        pairs.append(Pair(f"wg-{template}", occupation, template, sentences[adv], sentences[dis], adv, pct,
                          f"winogender-{stat}"))
    return pairs


def _strip_winobias(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("[", "").replace("]", "")).strip()


def load_winobias_pairs(folder: Path | str, split: Literal["dev", "test"] = "dev") -> list[Pair]:
    """Pro-stereotyped (advantaged) and anti-stereotyped (disadvantaged) sentences, matched line by line."""
    folder = Path(folder)
    pairs = []
    for kind in ("type1", "type2"):
        pro_path = folder / f"pro_stereotyped_{kind}.txt.{split}"
        anti_path = folder / f"anti_stereotyped_{kind}.txt.{split}"
        pro, anti = _read_winobias(pro_path), _read_winobias(anti_path)
        if len(pro) != len(anti):
            raise FairforgetError(f"{pro_path} has {len(pro)} sentences but {anti_path} has {len(anti)}")
        for index, ((line, p), (_, a)) in enumerate(zip(pro, anti)):
            occupation = re.search(r"\[(?:the |a |an )?([^\]]+)\]", p, flags=re.IGNORECASE)
            pronoun = re.findall(r"\[([^\]]+)\]", p)[-1].lower() if "[" in p else ""
            gender = "male" if pronoun in ("he", "him", "his") else "female" if pronoun in ("she", "her", "hers") \
                else "unknown"
            pairs.append(Pair(f"wb-{kind}-{split}-{index}", occupation[1].lower() if occupation else "",
                              f"{kind}.{split}.{line}", _strip_winobias(p), _strip_winobias(a), gender, None,
                              f"winobias-{kind}"))
    return pairs


def _read_winobias(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise FairforgetError(f"file not found: {path}")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        match = _WINOBIAS_LINE.match(line.strip())
        if not match:
            raise FairforgetError(f"{path}:{line_no}: expected '<number> <sentence>', got {line[:60]!r}")
        rows.append((line_no, match["text"]))
    return rows


def write_pairs_tsv(path: Path | str, pairs: list[Pair]) -> None:
    """The pairs as an unquoted TSV (read back with quoting off); a field holding a tab or a line break, which
    such a file cannot hold, is refused naming its pair."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PAIR_COLUMNS, delimiter="\t", quoting=csv.QUOTE_NONE,
                                quotechar=None)
        writer.writeheader()
        for pair in pairs:
            row = asdict(pair)
            row["pct_female"] = "" if pair.pct_female is None else pair.pct_female
            try:
                writer.writerow(row)
            except csv.Error as exc:
                raise FairforgetError(f"pair {pair.pair_id!r} has a field with a tab or line break, which a TSV "
                                      f"cannot hold ({exc})") from exc


def read_pairs_tsv(path: Path | str) -> list[Pair]:
    """Pairs written by :func:`write_pairs_tsv` (``scripts/10_preprocess_winogender.py``)."""
    pairs = []
    for line, row in _read_tsv(Path(path), PAIR_COLUMNS):
        if not row["advantaged"] or not row["disadvantaged"]:
            raise FairforgetError(f"{path}:{line}: empty sentence in pair {row['pair_id']!r}")
        try:
            pct = float(row["pct_female"]) if row["pct_female"] else None
        except ValueError as exc:
            raise FairforgetError(f"{path}:{line}: pct_female is not a number: {row['pct_female']!r}") from exc
        pairs.append(Pair(**{f.name: row[f.name] for f in fields(Pair) if f.name != "pct_female"}, pct_female=pct))
    if not pairs:
        raise FairforgetError(f"{path}: no pairs")
    return pairs


def load_winogender_sentences(sentences_path: Path | str) -> list[str]:
    """Every sentence of ``all_sentences.tsv`` (male, female and neutral), in file order."""
    rows = _read_tsv(Path(sentences_path), ["sentid", "sentence"])
    sentences = []
    for line, row in rows:
        if not (row["sentence"] or "").strip():
            raise FairforgetError(f"{sentences_path}:{line}: empty sentence")
        sentences.append(row["sentence"].strip())
    return sentences
