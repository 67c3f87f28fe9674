"""Build contrastive pairs (advantaged, disadvantaged) from WinoGender, group-first occupation contrasts and
WinoBias.

Each pair has an advantaged and a disadvantaged sentence differing only in the group term. ``winogender``:
the occupation statistic (``--stat bergsma`` or ``bls``) decides, below 50% women the male sentence is
advantaged, otherwise the female one. ``group_first``: "He is a nurse." / "She is a nurse." and similar,
group term first as in StereoSet's candidates, for each WinoGender occupation (``fairforget.pairs``), oriented
by the same statistic. ``winobias``: pro-stereotyped sentences are advantaged. StereoSet is never read.
Writes ``<out-dir>/<out-name>`` and ``<out-dir>/<stem>_summary.json`` (counts per source and orientation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.artifacts import write_json
from fairforget.provenance import provenance
from fairforget.config import output_field, run_script
from fairforget.errors import FairforgetError
from fairforget.pairs import group_first_pairs, orientation_counts
from fairforget.winogender import load_winobias_pairs, load_winogender_pairs, write_pairs_tsv

SOURCES = ("winogender", "group_first", "winobias")


@dataclass
class Config:
    winogender_dir: Path = field(default=Path("data/winogender/data"),
                                 metadata={"help": "folder with all_sentences.tsv and occupations-stats.tsv"})
    stat: Literal["bergsma", "bls"] = field(default="bergsma", metadata={"help": "occupation statistic"})
    sources: list[Literal["winogender", "group_first", "winobias"]] = field(
        default_factory=lambda: ["winogender"], metadata={"help": "pair sources to include"})
    winobias: bool = field(default=False, metadata={"help": "also add WinoBias pro/anti pairs (as --sources winobias)"})
    winobias_dir: Path = Path("data/winobias/data")
    winobias_split: Literal["dev", "test"] = "dev"
    out_dir: Path = output_field(Path("data/processed"), "pairs")
    out_name: str = field(default="pairs.tsv", metadata={"help": "file name of the pairs in --out-dir"})
    seed: int = 0  # no randomness here; kept for the common interface

    def validate(self) -> None:
        if not self.sources and not self.winobias:
            raise FairforgetError("--sources needs at least one of " + ", ".join(SOURCES))
        if not self.winogender_dir.is_dir():
            raise FairforgetError(f"--winogender-dir {self.winogender_dir} is not a folder (run scripts/00_fetch_data.py)")
        if (self.winobias or "winobias" in self.sources) and not self.winobias_dir.is_dir():
            raise FairforgetError(f"--winobias-dir {self.winobias_dir} is not a folder")
        if not self.out_name.endswith(".tsv") or "/" in self.out_name:
            raise FairforgetError(f"--out-name {self.out_name!r} must be a file name ending in .tsv")


def main(cfg: Config) -> None:
    sentences = cfg.winogender_dir / "all_sentences.tsv"
    stats = cfg.winogender_dir / "occupations-stats.tsv"
    sources = list(dict.fromkeys(cfg.sources + (["winobias"] if cfg.winobias else [])))
    pairs, data_files = [], [stats]
    if "winogender" in sources:
        pairs += load_winogender_pairs(sentences, stats, cfg.stat)
        data_files.append(sentences)
    if "group_first" in sources:
        pairs += group_first_pairs(stats, cfg.stat)
    if "winobias" in sources:
        pairs += load_winobias_pairs(cfg.winobias_dir, cfg.winobias_split)
        data_files += sorted(cfg.winobias_dir.glob(f"*_stereotyped_type?.txt.{cfg.winobias_split}"))
    out = cfg.out_dir / cfg.out_name
    write_pairs_tsv(out, pairs)
    summary = {
        "n_pairs": len(pairs),
        "sources": sources,
        "by_source": {s: sum(1 for p in pairs if p.source == s) for s in sorted({p.source for p in pairs})},
        "advantaged_gender": orientation_counts(pairs),
        "occupations": len({p.occupation for p in pairs}),
        "provenance": provenance(cfg, data_files),
    }
    write_json(cfg.out_dir / f"{Path(cfg.out_name).stem}_summary.json", summary)
    print(f"{len(pairs)} pairs -> {out}; {summary['advantaged_gender']}")


if __name__ == "__main__":
    run_script(main, Config())
