"""Build contrastive pairs (advantaged, disadvantaged) from WinoGender, group-first occupation contrasts and
WinoBias.

Each pair has an advantaged and a disadvantaged sentence differing only in the group term. ``winogender``:
the occupation statistic (``--stat bergsma`` or ``bls``) decides, below 50% women the male sentence is
advantaged, otherwise the female one. ``group_first``: "He is a nurse." / "She is a nurse." and similar,
group term first as in StereoSet's candidates, for each WinoGender occupation (``fairforget.pairs``), oriented
by the same statistic. ``winobias``: pro-stereotyped sentences are advantaged (``--winobias-split dev``: the
``winobias_dev`` transfer source; the WinoBias evaluation reads the test files). ``stereoset_selection``, the
in-domain source: the stereotype / anti-stereotype candidates of the StereoSet *selection*-half examples of
--stereoset-bias-types (``fairforget.pairs.stereoset_pairs``), less the seeded selection sample of
--choice-sample examples the methods choose their settings on (their ``--selection-limit``, same seeds) and less
any pair with a text of the held-out half. The held-out half is never trained on. Every other source leaves
StereoSet unread.
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
from fairforget.evals.stereoset import load_stereoset, scoring_requests, select_half
from fairforget.methods.selection import selection_examples
from fairforget.pairs import PAIR_SOURCES, group_first_pairs, orientation_counts, stereoset_pairs
from fairforget.winogender import load_winobias_pairs, load_winogender_pairs, write_pairs_tsv



@dataclass
class Config:
    winogender_dir: Path = field(default=Path("data/winogender/data"),
                                 metadata={"help": "folder with all_sentences.tsv and occupations-stats.tsv"})
    stat: Literal["bergsma", "bls"] = field(default="bergsma", metadata={"help": "occupation statistic"})
    sources: list[Literal["winogender", "group_first", "winobias", "stereoset_selection"]] = field(
        default_factory=lambda: ["winogender"], metadata={"help": "pair sources to include"})
    winobias: bool = field(default=False, metadata={"help": "also add WinoBias pro/anti pairs (as --sources winobias)"})
    winobias_dir: Path = Path("data/winobias/data")
    winobias_split: Literal["dev", "test"] = "dev"
    stereoset: Path = Path("data/stereoset/dev.json")
    stereoset_bias_types: list[Literal["gender", "profession", "race", "religion"]] = field(
        default_factory=lambda: ["gender"], metadata={"help": "stereoset_selection: bias types of the pairs"})
    choice_sample: int | None = field(default=120, metadata={
        "help": "stereoset_selection: the selection-half gender sample the methods choose on (their "
                "--selection-limit), left out of the pairs (None: the whole gender selection half is the choice "
                "sample, so nothing of gender is left)"})
    half_seed: int = 0
    out_dir: Path = output_field(Path("data/processed"), "pairs")
    out_name: str = field(default="pairs.tsv", metadata={"help": "file name of the pairs in --out-dir"})
    seed: int = field(default=0, metadata={"help": "seed of the choice sample (the methods' --seed)"})

    def validate(self) -> None:
        if not self.sources and not self.winobias:
            raise FairforgetError("--sources needs at least one of " + ", ".join(PAIR_SOURCES))
        if not self.winogender_dir.is_dir():
            raise FairforgetError(f"--winogender-dir {self.winogender_dir} is not a folder (run scripts/00_fetch_data.py)")
        if (self.winobias or "winobias" in self.sources) and not self.winobias_dir.is_dir():
            raise FairforgetError(f"--winobias-dir {self.winobias_dir} is not a folder")
        if "stereoset_selection" in self.sources and not self.stereoset.is_file():
            raise FairforgetError(f"--stereoset {self.stereoset} not found (run scripts/00_fetch_data.py)")
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
    excluded = {}
    if "stereoset_selection" in sources:
        examples = load_stereoset(cfg.stereoset)
        choice = {e.id for e in selection_examples(cfg.stereoset, "gender", cfg.choice_sample, cfg.half_seed, cfg.seed)}
        held_out = [prefix + continuation for e in select_half(examples, "heldout", cfg.half_seed)
                    for _, prefix, continuation in scoring_requests(e)]
        candidates = [e for e in select_half(examples, "selection", cfg.half_seed)
                      if e.bias_type in cfg.stereoset_bias_types and e.id not in choice]
        found = stereoset_pairs(candidates, held_out)
        excluded = {"choice_sample_examples": len(choice), "dropped_recurring_in_held_out": len(candidates) - len(found)}
        pairs += found
        data_files.append(cfg.stereoset)
    out = cfg.out_dir / cfg.out_name
    write_pairs_tsv(out, pairs)
    summary = {
        "n_pairs": len(pairs),
        "sources": sources,
        "by_source": {s: sum(1 for p in pairs if p.source == s) for s in sorted({p.source for p in pairs})},
        "advantaged_gender": orientation_counts(pairs),
        "occupations": len({p.occupation for p in pairs}),
        **({"stereoset_selection": excluded} if excluded else {}),
        "provenance": provenance(cfg, data_files),
    }
    write_json(cfg.out_dir / f"{Path(cfg.out_name).stem}_summary.json", summary)
    print(f"{len(pairs)} pairs -> {out}; {summary['advantaged_gender']}")


if __name__ == "__main__":
    run_script(main, Config())
