"""Where a study reads and writes: the repository's own folders and the data, models and outputs roots
(relative to the working folder, as the stage scripts' defaults are)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent
REPO = LIBRARY.parents[1]
SCRIPTS = REPO / "scripts"
CONFIGS = REPO / "configs"


@dataclass(frozen=True)
class Layout:
    """The data, outputs and models roots, and the data files the stages share."""

    data: Path = Path("data")
    outputs: Path = Path("outputs")
    models: Path = Path("models")

    @property
    def pairs(self) -> Path:
        return self.data / "processed" / "pairs.tsv"

    @property
    def group_first_pairs(self) -> Path:
        return self.data / "processed" / "pairs_group_first.tsv"

    @property
    def stereoset(self) -> Path:
        return self.data / "stereoset" / "dev.json"

    @property
    def crows(self) -> Path:
        return self.data / "crows_pairs" / "data" / "crows_pairs_anonymized.csv"

    @property
    def winobias(self) -> Path:
        return self.data / "winobias" / "data"

    @property
    def bbq(self) -> Path:
        return self.data / "bbq"

    @property
    def swap_lists(self) -> list[Path]:
        return [self.data / "winobias" / "generalized_swaps.txt", self.data / "winobias" / "extra_gendered_words.txt"]
