"""Whole run folders: written into a temporary sibling and swapped in with a completion marker
(``run_complete.json``, listing every file's size and hash), checked before a stage starts and before a
reader trusts one. Single files and provenance are in :mod:`fairforget.artifacts`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from fairforget.artifacts import atomic_dir, command_line, output_folder, sha256_file, write_json
from fairforget.errors import FairforgetError

RUN_MARKER = "run_complete.json"  # written last into every run folder; readers require it
RUN_KIND = "run"  # the marker kind of an evaluation run folder

SidePart = Literal["log", "resume", "best"]


def beside(out: Path | str, part: SidePart) -> Path:
    """The one layout of a training stage's folders next to its model folder ``<out>``: ``<out>_log`` (logs and
    figures), ``<out>_resume`` (the resumable training state, cleared once the model is written) and
    ``<out>_best`` (the kept evaluation point of a stage that chooses one, removed at the end)."""
    out = Path(out)
    return out.parent / f"{out.name}_{part}"


@contextlib.contextmanager
def run_folder(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling of the run folder ``path`` to write every result file into; on success write
    the completion marker and swap it in whole (``path`` keeps the earlier run until then); on error remove it.

    A folder that holds files but is not a fairforget run is refused rather than replaced
    (:func:`fairforget.artifacts.output_folder`).
    """
    with atomic_dir(path, RUN_KIND) as tmp:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / RUN_MARKER, {
            "complete": True, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command_line(),
            "files": {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in files}})


def check_run_target(path: Path | str) -> Path:
    """``path`` if a run may be written there (absent, empty, or an earlier run: :func:`artifacts.output_folder`);
    a stage calls this before its work so a wrong ``--out`` fails at once."""
    return output_folder(path, RUN_KIND)


def writes_run_folder(writer: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``writer(out_dir, ...)`` so it writes into a temporary folder swapped in by :func:`run_folder`."""
    @functools.wraps(writer)
    def wrapped(out_dir: Path | str, *args: Any, **kwargs: Any) -> Any:
        with run_folder(out_dir) as tmp:
            return writer(tmp, *args, **kwargs)

    return wrapped


def run_problem(folder: Path | str) -> str | None:
    """Why ``folder`` is not a complete run (None when it is): missing, no marker, or files not as recorded."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not found"
    marker = folder / RUN_MARKER
    if not marker.is_file():
        return (f"incomplete: it has no {RUN_MARKER} (the run was interrupted, or written before fairforget "
                f"marked complete runs)")
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"incomplete: its {RUN_MARKER} is unreadable"
    for name, entry in files.items():
        item = folder / name
        if not item.is_file() or item.stat().st_size != entry.get("bytes") or sha256_file(item) != entry.get("sha256"):
            return f"not the run its {RUN_MARKER} describes: {name} is missing or was changed"
    return None


def require_complete_run(folder: Path | str, what: str = "run folder") -> Path:
    """``folder`` if it holds a complete run; else one FairforgetError saying why and what to do."""
    problem = run_problem(folder)
    if problem:
        raise FairforgetError(f"{what} {folder} is {problem}; run its stage again"
                              if problem != "not found" else f"{what} {folder} not found")
    return Path(folder)
