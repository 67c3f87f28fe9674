"""Fetch the bias benchmarks into data/: StereoSet dev, BBQ, WinoGender, CrowS-Pairs, WinoBias.

Each file is downloaded from its pinned upstream commit (or copied from a local folder with the data/ layout,
``--source ../shared/data``), and its size and sha256 are checked against src/fairforget/dataset_manifest.json
before it is renamed into place. Files already present with the right hash are skipped, so re-running is
cheap and resumes an interrupted fetch. Any bad file gives one error naming it, exit 2, and nothing unverified
in data/. At the end data/MANIFEST.json records what was verified, from where and when.
Usage: no flags downloads everything; `--source ../shared/data` copies from a verified local mirror;
`--datasets bbq winogender --force` re-fetches two datasets.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fairforget.artifacts import write_json
from fairforget.provenance import provenance
from fairforget.config import output_field, run_script
from fairforget.datasets import DATA_DIR, DATASETS, RAW_GITHUB, Dataset, FetchResult, dataset_files, fetch
from fairforget.errors import FairforgetError


@dataclass
class Config:
    datasets: list[Dataset] = field(default_factory=lambda: list(DATASETS),
                                    metadata={"help": "which datasets to fetch"})
    out: Path = output_field(DATA_DIR, "data", "data root; files land in OUT/<dataset>/")
    source: Path | None = field(default=None, metadata={"help": "copy from this folder (data/ layout) "
                                                                 "instead of downloading"})
    force: bool = field(default=False, metadata={"help": "re-fetch files even when present and verified"})
    base_url: str = field(default=RAW_GITHUB, metadata={"help": "raw-file server: BASE/OWNER/REPO/COMMIT/PATH "
                                                                "(https://, http:// or file://)"})
    timeout: float = field(default=60.0, metadata={"help": "seconds before a stalled download fails"})

    def validate(self) -> None:
        if not self.datasets:
            raise FairforgetError("--datasets needs at least one of: " + " ".join(DATASETS))
        if self.source is not None and not Path(self.source).is_dir():
            raise FairforgetError(f"--source {self.source} is not a folder")
        if not self.base_url.startswith(("https://", "http://", "file://")):
            raise FairforgetError(f"--base-url {self.base_url!r} must start with https://, http:// or file://")
        if self.timeout <= 0:
            raise FairforgetError(f"--timeout must be positive, got {self.timeout}")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    chosen = list(dict.fromkeys(cfg.datasets))
    source = Path(cfg.source).resolve() if cfg.source is not None else None
    print(f"fetching {', '.join(chosen)} into {cfg.out}/ from {source or cfg.base_url}")
    results = fetch([spec for name in chosen for spec in dataset_files(name)], cfg.out, source=source,
                    base_url=cfg.base_url, timeout=cfg.timeout, force=cfg.force)
    print(summary_table(chosen, results))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines = "\n".join(f"  {r.spec.file}: {r.error}" for r in failed)
        raise FairforgetError(f"{len(failed)} of {len(results)} files failed verification; they were not written "
                              f"and existing files were left as they were:\n{lines}")
    write_manifest(cfg, results)
    print(f"verified {len(results)} files in {time.perf_counter() - start:.1f} s; wrote {cfg.out / 'MANIFEST.json'}")


def summary_table(datasets: list[str], results: list[FetchResult]) -> str:
    """One row per dataset: files, bytes and how many were fetched, skipped or failed."""
    rows = [("dataset", "files", "bytes", "status")]
    for name in datasets:
        mine = [r for r in results if r.spec.dataset == name]
        counts = {s: sum(r.status == s for r in mine) for s in ("copied", "downloaded", "present", "failed")}
        status = ", ".join(f"{n} {'skipped (present)' if s == 'present' else s.upper() if s == 'failed' else s}"
                           for s, n in counts.items() if n)
        rows.append((name, str(len(mine)), f"{sum(r.spec.bytes for r in mine):,}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows)


def write_manifest(cfg: Config, results: list[FetchResult]) -> None:
    """data/MANIFEST.json: every verified file, from where and when; entries of datasets not fetched now stay."""
    path = Path(cfg.out) / "MANIFEST.json"
    previous = _previous_entries(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entries = dict(previous)
    for r in results:
        entries[r.spec.file] = {
            "file": r.spec.file, "bytes": r.spec.bytes, "sha256": r.spec.sha256, "upstream": r.spec.upstream,
            "status": r.status, "verified_utc": now,
            "source": r.source if r.source is not None else previous.get(r.spec.file, {}).get("source"),
        }
    write_json(path, {"provenance": provenance(cfg), "files": sorted(entries.values(), key=lambda e: e["file"])})


def _previous_entries(path: Path) -> dict[str, dict]:
    """Entries of an earlier data/MANIFEST.json by file (none if it is missing or unreadable)."""
    try:
        return {e["file"]: e for e in json.loads(path.read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


if __name__ == "__main__":
    run_script(main, Config(), verify_data=False)  # it repairs data/: nothing to verify before
