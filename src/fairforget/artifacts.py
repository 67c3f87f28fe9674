"""Writing results safely: atomic files and folders, and the provenance block of results.

Every file goes to a temporary sibling and is renamed into place (:func:`atomic_path`, :func:`atomic_dir`), so
a reader sees the earlier version or the new one, never half of one; a fault-injection hook
(``FAIRFORGET_FAULT_AFTER_WRITES``) lets tests kill a stage after any write. Whole run folders with their
completion marker are in :mod:`fairforget.run_folders`.
JSON is written strictly: NaN and infinities become ``null``, with a note saying so.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import errno
import glob
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from fairforget import distributed
from fairforget.errors import FairforgetError

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "numpy", "safetensors", "tokenizers")
FAULT_ENV = "FAIRFORGET_FAULT_AFTER_WRITES"  # test hook: die right after the N-th artifact write (or swap)
FAULT_MODE_ENV = "FAIRFORGET_FAULT_MODE"  # "kill" (SIGKILL, the default) or "raise" (InjectedFault)
NULL_NOTE = ("null marks an undefined value (NaN or infinite: e.g. a metric of a group with no examples, or an "
             "interval without finite bootstrap replicates)")
_TEMP_NAME = re.compile(r"(?P<pid>\d+)-[^/]*\.tmp|old-(?P<old>\d+)")  # atomic_dir's temporaries, after ".NAME."
FOLDER_MARKER = ".fairforget.json"  # in every folder a stage writes: {"kind": ...}, what wrote it
WHOLE_FOLDER_KINDS = ("model", "adapter", "run", "training state")  # written by atomic_dir, replaced whole
PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parents[1]  # the repository root of a source checkout (src/fairforget)
SMALL_N = 10  # below this many items a 95% interval is unreliable (often zero-width): the stages warn


class InjectedFault(BaseException):
    """Raised by the fault-injection hook in ``raise`` mode (a BaseException, like a kill, so no handler eats it)."""


_write_count = 0


def reset_write_count() -> None:
    """Start counting artifact writes for the fault-injection hook from zero (tests running stages in-process)."""
    global _write_count
    _write_count = 0


def _after_write(what: Path) -> None:
    """Count one artifact write; with ``FAIRFORGET_FAULT_AFTER_WRITES=N`` the N-th one kills the process."""
    global _write_count
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    _write_count += 1
    if _write_count == int(limit):
        if os.environ.get(FAULT_MODE_ENV, "kill") == "raise":
            raise InjectedFault(f"injected fault after artifact write {_write_count} ({what})")
        os.kill(os.getpid(), signal.SIGKILL)


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
            _after_write(path)
        else:
            tmp.unlink()
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, path)
        raise


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """A full disk or a file-size limit becomes one clear error; the temporary copy is already gone and ``path``
    untouched. Also for the safetensors writer, whose error carries the OS code in its text."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        found = re.search(r"code: (\d+)", str(exc))
        code = int(found[1]) if found else None
    reasons = {errno.ENOSPC: ("no space left on the device", "Free some space"),
               errno.EFBIG: ("a file grew past the size limit of this process (ulimit -f) or file system",
                             "Raise the limit (ulimit -f unlimited)")}
    if code in reasons:
        reason, fix = reasons[code]
        kept = "the earlier version was left as it was" if path.exists() else "nothing was written"
        raise FairforgetError(f"{reason} while writing {path}; {kept}. {fix} and run the stage again") from exc


def _writes_results() -> bool:
    """Only rank 0 of a multi-process run puts results in place (see fairforget.distributed)."""
    return distributed.is_main()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: Path | str, kind: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` holding the marker of ``kind``; on success it replaces ``path``
    whole, on error it is removed. ``path`` must be a valid target for ``kind`` (:func:`output_folder`); a
    symbolic link is written through (its target replaced)."""
    path = output_folder(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        _write_marker(tmp, kind)
        yield tmp
        if not _writes_results():
            shutil.rmtree(tmp)
        else:
            _readable_modes(tmp)
            _swap_in(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(exc, path)
        raise


def _readable_modes(folder: Path) -> None:
    """Give every file in ``folder`` the mode of a fresh file (0644 under the usual umask): some writers (the
    weight savers) create theirs 0600."""
    mask = _umask()
    for item in folder.rglob("*"):
        if item.is_file() and not item.is_symlink():
            os.chmod(item, 0o666 & ~mask)


def output_folder(path: Path | str, kind: str, flag: str = "--out") -> Path:
    """The folder a result of ``kind`` is written at: ``path``, a symbolic link resolved to its target. Refused
    with one FairforgetError naming ``flag``: an empty path or ``.``, a file, a path inside a file, the fairforget
    checkout or package (or a folder above it), a place that cannot be written, and a non-empty folder that is
    not a fairforget result of the same ``kind`` (its marker ``.fairforget.json`` says what wrote it)."""
    if str(path) in ("", "."):
        raise FairforgetError(f"{flag} {str(path)!r} names the current folder; give the results a folder of "
                              f"their own")
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    full = path.resolve()
    blocker = next((p for p in [full, *full.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == full else f"is inside the file {blocker}"
        raise FairforgetError(f"{flag} {path} {where}; pass a folder")
    if full == Path.cwd() or full == PACKAGE_DIR or PACKAGE_DIR in full.parents or full in CHECKOUT_DIR.parents \
            or full == CHECKOUT_DIR:
        raise FairforgetError(f"{flag} {path} is the current folder, the fairforget checkout or its package (or a "
                              f"folder above them); a stage replaces its output folder, so name a new one")
    if full.is_dir() and any(full.iterdir()) and not _holds_result(full, kind):
        shown = ", ".join(sorted(p.name for p in full.iterdir())[:5])
        raise FairforgetError(f"{flag} {path} holds files that are not a fairforget {kind} ({shown}); a stage never "
                              f"replaces or adds to such a folder: choose a new or empty one with {flag}")
    _check_writable(full, flag)
    return path


def claim_folder(path: Path | str, kind: str, flag: str = "--out") -> Path:
    """Check ``path`` as :func:`output_folder` does and create it with the marker of ``kind``: for a folder that
    a stage adds its files to rather than replacing it whole."""
    path = output_folder(path, kind, flag)
    if _writes_results() and not (path / FOLDER_MARKER).is_file():
        path.mkdir(parents=True, exist_ok=True)
        _write_marker(path, kind)
    return path


def _holds_result(folder: Path, kind: str) -> bool:
    """Whether ``folder`` is a fairforget result of ``kind``: its marker says so; a folder written before the
    marker existed counts when a pipeline stage record (``.stage.json``, ``.NAME.stage.json``) is in it, or for a
    run a run file, for a data root its MANIFEST.json."""
    try:
        return json.loads((folder / FOLDER_MARKER).read_text()).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        legacy = {"run": ("metrics.json", "run_complete.json"), "data": ("MANIFEST.json",)}.get(kind, ())
        return not (folder / FOLDER_MARKER).exists() and any(
            p.name.endswith(".stage.json") or p.name in legacy for p in folder.iterdir())


def _write_marker(folder: Path, kind: str) -> None:
    """The marker saying what ``folder`` holds (a plain write: the folder is new or about to be swapped in)."""
    (folder / FOLDER_MARKER).write_text(json.dumps({"kind": kind, "written_by": "fairforget"}) + "\n")


def _check_writable(full: Path, flag: str) -> None:
    """Refuse an output that cannot be written before any work: a file is created and removed in the nearest
    existing folder above it and in the folder itself (a read-only file system shows only so, not in its modes)."""
    nearest = next(p for p in [full.parent, *full.parent.parents] if p.exists())
    for folder in [nearest] + ([full] if full.is_dir() else []):
        try:
            fd, probe = tempfile.mkstemp(prefix=".fairforget-probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise FairforgetError(f"{flag} {full} cannot be written: {folder} is not writable ({exc.strerror}); "
                                  f"choose another folder") from exc


def save_model(model: Any, tokenizer: Any, folder: Path | str, info: dict[str, Any] | None = None) -> Path:
    """A loadable Hugging Face model folder (safetensors; a peft model is merged into a copy first), with
    each ``info`` entry written as a JSON file beside the weights; swapped in whole (:func:`atomic_dir`)."""
    to_save = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    with atomic_dir(folder, "model") as tmp:
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, content in (info or {}).items():
            write_json(tmp / name, content)
    return Path(folder)


def _clean_stale(path: Path) -> None:
    """Remove what killed writers of ``path`` left beside it (their temporary folders), and put back an earlier
    folder that a killed two-rename swap had set aside."""
    if not _writes_results():
        return
    for item in path.parent.glob(f".{glob.escape(path.name)}.*"):
        match = _TEMP_NAME.fullmatch(item.name[len(path.name) + 2:])
        if not match or _alive(int(match["pid"] or match["old"])):
            continue
        if match["old"] and not path.exists():
            os.replace(item, path)
        elif item.is_dir():
            shutil.rmtree(item, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` at ``path``: one atomic exchange with the earlier folder where the OS has it
    (Linux renameat2), else two renames with the earlier folder kept aside until the second is done."""
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):  # tmp now holds the earlier folder
        _after_write(path)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _after_write(path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); False where the OS or file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))



def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, data: Any) -> None:
    """Strict JSON: NaN / infinity become null, and a dict result then says so (in its provenance if it has one)."""
    data, nulls = _strict(data)
    if nulls and isinstance(data, dict):
        note = f"{nulls} value(s) written as null: {NULL_NOTE}"
        if isinstance(data.get("provenance"), dict):
            data["provenance"]["null_values"] = note
        else:
            data["null_values"] = note
    write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(_strict(row)[0], allow_nan=False) + "\n")


def _strict(value: Any) -> tuple[Any, int]:
    """``value`` made of plain JSON types (numpy values, paths converted) with NaN / inf as None; and how many."""
    if isinstance(value, dict):
        pairs = [(k, _strict(v)) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, sum(n for _, (_, n) in pairs)
    if isinstance(value, (list, tuple)):
        parts = [_strict(v) for v in value]
        return [v for v, _ in parts], sum(n for _, n in parts)
    if isinstance(value, float):
        return (value, 0) if math.isfinite(value) else (None, 1)
    if value is None or isinstance(value, (str, int, bool)):
        return value, 0
    return _strict(_json_default(value))


def small_n_warnings(counts: dict[str, int], what: str, minimum: int = SMALL_N) -> list[str]:
    """One warning naming the groups with fewer than ``minimum`` items (their intervals are unreliable), printed
    to stderr and returned (as a list, empty when there are none) for the result's provenance."""
    small = [f"{name} (n={n})" for name, n in counts.items() if 0 < n < minimum]
    if not small:
        return []
    note = (f"{what}: {len(small)} group(s) with fewer than {minimum} items, whose 95% intervals are unreliable "
            f"(at tiny n the bootstrap interval is often zero-width): {', '.join(small)}")
    print(f"warning: {note}", file=sys.stderr)
    return [note]


def write_csv(path: Path | str, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


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
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def command_line() -> str:
    """This process's command line (``sys.argv``), shell-quoted so a path with spaces reads back as one argument."""
    return shlex.join(sys.argv)


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
