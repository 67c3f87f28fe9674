"""Writing results safely: atomic files and folders, and the provenance block every result carries."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import FairforgetError

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "numpy", "safetensors", "tokenizers")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        if _writes_results():
            os.replace(tmp, path)
        else:
            tmp.unlink()
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, path)
        raise


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """A full disk becomes one clear error; the temporary copy is already gone and ``path`` untouched."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        kept = "the earlier version was left as it was" if path.exists() else "nothing was written"
        raise FairforgetError(f"no space left on the device while writing {path}; {kept}. Free some space "
                              f"and run the stage again") from exc


def _writes_results() -> bool:
    """Only rank 0 of a multi-process run puts results in place (see fairforget.distributed)."""
    from .distributed import is_main

    return is_main()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if not _writes_results():
            shutil.rmtree(tmp)
        elif path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(exc, path)
        raise


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=_json_default) + "\n")


def write_csv(path: Path | str, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig: Any, path: Path | str) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def read_json(path: Path | str, what: str = "file") -> Any:
    """Read JSON with one clear error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FairforgetError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FairforgetError(f"{what} {path} is not valid JSON: {exc}") from exc


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def git_commit() -> str | None:
    """The commit of the fairforget checkout (with ``-dirty`` when it has changes), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(config: Any = None, data_files: Iterable[Path | str] = (), **extra: Any) -> dict[str, Any]:
    """The provenance block of a result: config, versions, git commit, data hashes, time, command line and
    the number of processes that computed it."""
    from . import distributed
    from .config import config_to_dict

    block: dict[str, Any] = {
        "fairforget_version": __import__("fairforget").__version__,
        "git_commit": git_commit(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "processes": distributed.world_size(),
        "packages": package_versions(),
        "config": config_to_dict(config) if config is not None else None,
        "data_sha256": {str(p): sha256_file(p) for p in data_files},
    }
    block.update(extra)
    return block


def read_jsonl(path: Path | str, what: str = "file") -> list[dict]:
    """Read a JSON-lines file; a bad line raises an error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FairforgetError(f"{what} not found: {path}")
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FairforgetError(f"{what} {path} line {number} is not valid JSON: {exc.msg}") from exc
    return rows
