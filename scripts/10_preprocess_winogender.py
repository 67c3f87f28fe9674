"""Turn WinoGender sentence triples (and optionally WinoBias pro/anti sentences) into contrastive pairs.

Each pair has an advantaged and a disadvantaged sentence differing only in the gendered pronoun. For
WinoGender the occupation statistic decides: below 50% women (``--stat bergsma`` or ``bls``) the male
sentence is advantaged, otherwise the female one. WinoBias pro-stereotyped sentences are advantaged.
Writes ``<out-dir>/pairs.tsv`` and ``<out-dir>/pairs_summary.json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fairforget.artifacts import provenance, write_json
from fairforget.config import run_script
from fairforget.errors import FairforgetError
from fairforget.winogender import load_winobias_pairs, load_winogender_pairs, write_pairs_tsv


@dataclass
class Config:
    winogender_dir: Path = field(default=Path("data/winogender/data"),
                                 metadata={"help": "folder with all_sentences.tsv and occupations-stats.tsv"})
    stat: Literal["bergsma", "bls"] = field(default="bergsma", metadata={"help": "occupation statistic"})
    winobias: bool = field(default=False, metadata={"help": "also add WinoBias pro/anti pairs"})
    winobias_dir: Path = Path("data/winobias/data")
    winobias_split: Literal["dev", "test"] = "dev"
    out_dir: Path = Path("data/processed")
    seed: int = 0  # no randomness here; kept for the common interface

    def validate(self) -> None:
        if not self.winogender_dir.is_dir():
            raise FairforgetError(f"--winogender-dir {self.winogender_dir} is not a folder (run scripts/00_fetch_data.py)")
        if self.winobias and not self.winobias_dir.is_dir():
            raise FairforgetError(f"--winobias-dir {self.winobias_dir} is not a folder")


def main(cfg: Config) -> None:
    sentences = cfg.winogender_dir / "all_sentences.tsv"
    stats = cfg.winogender_dir / "occupations-stats.tsv"
    pairs = load_winogender_pairs(sentences, stats, cfg.stat)
    data_files = [sentences, stats]
    if cfg.winobias:
        pairs += load_winobias_pairs(cfg.winobias_dir, cfg.winobias_split)
        data_files += sorted(cfg.winobias_dir.glob(f"*_stereotyped_type?.txt.{cfg.winobias_split}"))
    write_pairs_tsv(cfg.out_dir / "pairs.tsv", pairs)
    summary = {
        "n_pairs": len(pairs),
        "by_source": dict(Counter(p.source for p in pairs)),
        "advantaged_gender": dict(Counter(f"{p.source}:{p.adv_gender}" for p in pairs)),
        "occupations": len({p.occupation for p in pairs}),
        "provenance": provenance(cfg, data_files),
    }
    write_json(cfg.out_dir / "pairs_summary.json", summary)
    print(f"{len(pairs)} pairs -> {cfg.out_dir / 'pairs.tsv'}; {summary['advantaged_gender']}")


if __name__ == "__main__":
    run_script(main, Config())
