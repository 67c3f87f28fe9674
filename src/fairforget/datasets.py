"""Where the benchmark datasets live, and how they are fetched and verified against the pinned manifest.

``dataset_manifest.json`` (shipped beside this module) pins every file: its path under ``data/``, byte size,
sha256 and upstream location ``github:OWNER/REPO@COMMIT:PATH``. :func:`fetch` copies files from a local
folder with the ``data/`` layout or downloads them from the pinned commits, verifying size and sha256 before
the final rename, so ``data/`` never holds an unverified file. Stages locate inputs with :func:`data_path` and
check them with :func:`verify_dataset`, whose return value goes into their provenance.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Literal, get_args

from fairforget.artifacts import atomic_path, sha256_file
from fairforget.errors import FairforgetError

Dataset = Literal["stereoset", "bbq", "winogender", "crows_pairs", "winobias"]
DATASETS: tuple[str, ...] = get_args(Dataset)
DATA_DIR = Path("data")  # default root, relative to the repository root where scripts run
RAW_GITHUB = "https://raw.githubusercontent.com"
FETCH_HINT = "python scripts/00_fetch_data.py"
CHUNK = 1 << 20

Opener = Callable[..., BinaryIO]  # called as opener(url, timeout=seconds), like urllib.request.urlopen


@dataclass(frozen=True)
class FileSpec:
    """One pinned file: ``file`` is its path under the data root, e.g. ``bbq/data/Age.jsonl``."""

    file: str
    bytes: int
    sha256: str
    upstream: str  # github:OWNER/REPO@COMMIT:PATH

    @property
    def dataset(self) -> str:
        return self.file.split("/", 1)[0]

    def url(self, base_url: str = RAW_GITHUB) -> str:
        """Raw download URL at the pinned commit: ``BASE/OWNER/REPO/COMMIT/PATH``."""
        repo, _, rest = self.upstream.removeprefix("github:").partition("@")
        commit, _, path = rest.partition(":")
        return f"{base_url.rstrip('/')}/{repo}/{commit}/{urllib.parse.quote(path)}"


@lru_cache(maxsize=1)
def manifest() -> tuple[FileSpec, ...]:
    """Every pinned file, in manifest order."""
    data = json.loads(resources.files(__package__).joinpath("dataset_manifest.json").read_text())
    return tuple(FileSpec(e["file"], e["bytes"], e["sha256"], e["upstream"]) for e in data["files"])


def dataset_files(dataset: str) -> list[FileSpec]:
    """The pinned files of one dataset (FairforgetError for an unknown name)."""
    if dataset not in DATASETS:
        raise FairforgetError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    return [spec for spec in manifest() if spec.dataset == dataset]


def data_path(dataset: str, relative: str, root: Path | str = DATA_DIR) -> Path:
    """Path of a pinned file, e.g. ``data_path("bbq", "data/Age.jsonl")`` -> ``data/bbq/data/Age.jsonl``."""
    name = f"{dataset}/{relative}"
    if name not in {spec.file for spec in dataset_files(dataset)}:
        raise FairforgetError(f"{name} is not a file of the pinned {dataset} dataset (see dataset_manifest.json)")
    return Path(root) / name


def verify_dataset(root: Path | str, dataset: str) -> list[dict[str, Any]]:
    """Check every file of ``dataset`` under ``root`` against the manifest; return them for provenance.

    Each entry is ``{"file", "bytes", "sha256", "upstream"}``. A missing, truncated or altered file raises one
    FairforgetError naming it and the command that repairs it.
    """
    checked = []
    for spec in dataset_files(dataset):
        path = Path(root) / spec.file
        repair = f"run `{FETCH_HINT} --datasets {dataset} --out {root}`"
        if not path.is_file():
            raise FairforgetError(f"dataset file missing: {path}; {repair}")
        problem = pinned_problem(spec, path)
        if problem:
            raise FairforgetError(f"dataset file {path} does not match the pinned manifest: {problem}; {repair}")
        checked.append({"file": spec.file, "bytes": spec.bytes, "sha256": spec.sha256, "upstream": spec.upstream})
    return checked


def read_table(path: Path | str, required: Iterable[str] = (), delimiter: str = ",",
               what: str = "file") -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV / TSV file with a header, each with its line number; a missing file, a header without the
    ``required`` columns, or a row with another number of columns than the header raises one FairforgetError
    naming the file and line. A TSV is read with quoting off (its fields are never quoted, so a stray ``"``
    is a character, not the start of a field running over the next lines: one line is one row)."""
    path = Path(path)
    if not path.is_file():
        raise FairforgetError(f"{what} not found: {path}")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = next(reader, [])
        missing = [c for c in required if c not in header]
        if missing:
            raise FairforgetError(f"{path}: header lacks column(s) {', '.join(missing)}")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise FairforgetError(f"{path}:{reader.line_num}: {len(row)} columns, expected {len(header)} "
                                      f"as in the header ({', '.join(header)})")
            rows.append((reader.line_num, dict(zip(header, row))))
    return rows


# ---- verification at use: every pinned file a stage reads ---------------------------------------------------

_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) hashed and found pinned in this process


def is_data_root(folder: Path) -> bool:
    """A folder with the ``data/`` layout whose files must be the pinned ones: it has a MANIFEST.json (written
    by the fetch stage, or a verified mirror's), or it is the default ``data/``."""
    return (folder / "MANIFEST.json").is_file() or folder.resolve() == DATA_DIR.resolve()


def pinned_files(path: Path | str) -> list[tuple[Path, FileSpec]]:
    """The pinned files that ``path`` (a file, or a folder such as ``data/bbq``) stands for inside a data root,
    with their specs; [] for a file or folder outside one (a custom input)."""
    path = Path(path).absolute()
    found = []
    for spec in manifest():
        parts = tuple(spec.file.split("/"))
        for k in range(len(parts) + 1):  # path is the root (k=0), a folder in it, or the file itself
            if (k == 0 or path.parts[-k:] == parts[:k]) and len(path.parts) > k and is_data_root(
                    path.parents[k - 1] if k else path):
                candidate = path.joinpath(*parts[k:])
                if candidate.is_file():
                    found.append((candidate, spec))
                break
    return found


def pinned_problem(spec: FileSpec, path: Path) -> str | None:
    """Why the file at ``path`` is not the pinned one (None if it is): its size, then its sha256, hashed once per
    process (a file changed since, in size or mtime, is hashed again). A same-size edit with its mtime restored
    is caught: nothing recorded on disk is trusted instead of the hash."""
    stat = path.stat()
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return None
    problem = _mismatch(spec, stat.st_size, None) or _mismatch(spec, spec.bytes, sha256_file(path))
    if problem is None:
        _verified.add(key)
    return problem


def check_data_inputs(paths: dict[str, Path]) -> None:
    """Verify the pinned files behind each ``{flag: path}`` a stage was given; a modified one raises one
    FairforgetError naming it, with how to proceed. Custom files (outside a data root) are not checked here:
    their own sha256 goes into the result's provenance."""
    for flag, path in paths.items():
        for file, spec in pinned_files(path):
            problem = pinned_problem(spec, file)
            if problem:
                raise FairforgetError(
                    f"data file {file} does not match the pinned manifest ({problem}). Re-fetch it with "
                    f"`{FETCH_HINT} --datasets {spec.dataset} --force` (add --source DIR to copy from a local "
                    f"mirror); or, to use a modified file on purpose, copy it outside the data folder and pass "
                    f"the copy with {flag} (a custom file is recorded with its own sha256)")


def data_problem(root: Path | str) -> str | None:
    """The first pinned file under the data root ``root`` that is missing or modified, as a reason (None if all
    are the pinned ones): the pipeline re-checks its data step with this instead of trusting its record."""
    for spec in manifest():
        path = Path(root) / spec.file
        if not path.is_file():
            return f"data file {path} is missing"
        problem = pinned_problem(spec, path)
        if problem:
            return f"data file {path} does not match the pinned manifest ({problem})"
    return None


@dataclass
class FetchResult:
    """What happened to one file: ``status`` is present (already verified), copied, downloaded or failed."""

    spec: FileSpec
    status: Literal["present", "copied", "downloaded", "failed"]
    source: str | None = None
    error: str | None = None


def fetch(specs: Iterable[FileSpec], out: Path | str, *, source: Path | str | None = None,
          base_url: str = RAW_GITHUB, opener: Opener = urllib.request.urlopen, timeout: float = 60.0,
          force: bool = False, log: Callable[[str], None] = print) -> list[FetchResult]:
    """Put each file under ``out``, copied from ``source`` (same layout) or downloaded from ``base_url``.

    Files already present with the right sha256 are kept (unless ``force``). Every new file is streamed to a
    temporary name beside its destination, its size and sha256 checked, then renamed into place; on any
    mismatch the temporary file is deleted and an existing file is left untouched. Verification failures of
    single files are collected (status ``failed``) so one run reports them all; a network failure stops at once.
    """
    results = []
    for spec in specs:
        dest = Path(out) / spec.file
        if not force and dest.is_file() and _is_verified(spec, dest):
            log(f"skip      {spec.file} (present, sha256 ok)")
            results.append(FetchResult(spec, "present"))
            continue
        where = str(Path(source) / spec.file) if source is not None else spec.url(base_url)
        try:
            with _open(spec, where, source is not None, opener, timeout) as handle:
                _stream_verified(spec, handle, dest)
        except _FileFailure as exc:
            log(f"FAILED    {spec.file}: {exc}")
            results.append(FetchResult(spec, "failed", where, str(exc)))
            continue
        status = "copied" if source is not None else "downloaded"
        log(f"{status:<9} {spec.file} ({spec.bytes:,} bytes, sha256 ok)")
        results.append(FetchResult(spec, status, where))
    return results


class _FileFailure(Exception):
    """One file could not be verified; recorded, and the run goes on to the next file."""


def _open(spec: FileSpec, where: str, local: bool, opener: Opener, timeout: float) -> BinaryIO:
    if local:
        try:
            return open(where, "rb")
        except FileNotFoundError:
            raise _FileFailure(f"source file missing: {where} (expected {spec.bytes:,} bytes)") from None
        except OSError as exc:
            raise _FileFailure(f"cannot read source file {where}: {exc}") from None
    try:
        return opener(where, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise _FileFailure(f"download failed: {where}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):  # a file:// mirror without this file
            raise _FileFailure(f"source file missing: {where} (expected {spec.bytes:,} bytes)") from None
        raise _unreachable(spec, where, exc.reason) from None
    except (OSError, ValueError) as exc:  # timeouts, refused connections, malformed URLs
        raise _unreachable(spec, where, exc) from None


def _unreachable(spec: FileSpec, where: str, reason: object) -> FairforgetError:
    return FairforgetError(f"cannot download {spec.file} from {where}: {reason}. Files verified so far are kept; "
                           f"re-run when the network is back, or copy from a local folder with --source DIR")


def _stream_verified(spec: FileSpec, handle: BinaryIO, dest: Path) -> None:
    """Copy ``handle`` to a temporary file beside ``dest``, check size and sha256, then rename it over ``dest``."""
    digest, size = hashlib.sha256(), 0
    try:
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as target:
                while chunk := handle.read(CHUNK):
                    size += len(chunk)
                    if size > spec.bytes:
                        raise _FileFailure(f"larger than expected: more than {spec.bytes:,} bytes")
                    digest.update(chunk)
                    target.write(chunk)
            problem = _mismatch(spec, size, digest.hexdigest())
            if problem:
                raise _FileFailure(problem)
    except (OSError, http.client.HTTPException) as exc:  # a dropped connection mid-transfer, a full disk
        raise _FileFailure(f"failed after {size:,} bytes: {exc}") from None


def _is_verified(spec: FileSpec, path: Path) -> bool:
    return path.stat().st_size == spec.bytes and sha256_file(path) == spec.sha256


def _mismatch(spec: FileSpec, size: int, sha256: str | None) -> str | None:
    """Why a file of this size and hash is not the pinned one (None if it is; ``sha256=None`` checks size only)."""
    if size != spec.bytes:
        return f"expected {spec.bytes:,} bytes, found {size:,} (truncated or wrong version)"
    if sha256 is not None and sha256 != spec.sha256:
        return f"sha256 mismatch: expected {spec.sha256}, found {sha256} (corrupted or wrong version)"
    return None
