"""One progress bar for every long loop (tqdm): rate and ETA on a terminal, plain lines in logs, silent if quiet.

    from fairforget.progress import progress, set_quiet
    for batch in progress(batches, desc="scoring", unit="batch"):
        ...
    with progress(total=steps, desc="epoch 1", unit="step") as bar:
        bar.set_postfix(loss=f"{loss:.3f}"); bar.update(1)   # postfix first: it shows on that update's line

The bar goes to stdout, so ``run_pipeline.py`` (which streams each stage's stdout) shows it. When stdout is
a terminal it is tqdm's redrawn bar. Otherwise (a pipe, CI, a log file) each update is one whole line, at most
one every ``FAIRFORGET_PROGRESS_SECONDS`` seconds (default 5; 0 prints every update) plus the last one.
A bar appears only once its loop has run ``delay`` seconds (default 2), so short loops print nothing.
``set_quiet(True)`` (a stage's ``--quiet``) or ``FAIRFORGET_QUIET=1`` turns every bar off; under torchrun only
rank 0 shows one.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable

from tqdm import tqdm

from fairforget import distributed

LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"

DELAY_SECONDS = 2.0

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of this process off (True) or back on (False)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """Whether bars are off: ``set_quiet(True)``, ``FAIRFORGET_QUIET=1`` or a non-zero torchrun rank."""
    return _quiet or os.environ.get("FAIRFORGET_QUIET", "") not in ("", "0") or not distributed.is_main()


def _line_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("FAIRFORGET_PROGRESS_SECONDS", "5")))
    except ValueError:
        return 5.0


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A stream wrapper turning tqdm's ``\\r``-redrawn status into whole lines (empty redraws dropped)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = ANSI_ESCAPE.sub("", text).strip()  # a nested bar's cursor moves would print as "[A" lines
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LineBar(tqdm):
    """tqdm for pipes and logs: one line per shown update; a postfix joins the next line, no extra line."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        super().set_postfix_str(s, refresh=refresh)

    def set_description(self, desc: str | None = None, refresh: bool = False) -> None:
        super().set_description(desc, refresh=refresh)

    def close(self) -> None:
        if not self.disable and getattr(self, "last_print_n", None) == self.n:
            self.leave = False  # the last update is already a line: do not print it twice
        super().close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", leave: bool = True, delay: float | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps); see the module doc for the modes.
    ``delay`` defaults to :data:`DELAY_SECONDS`, read at each call."""
    delay = DELAY_SECONDS if delay is None else delay
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    stream = kwargs.pop("file", sys.stdout)
    common = dict(total=total, desc=desc, unit=unit, leave=leave, file=stream, disable=is_quiet(), delay=delay,
                  **kwargs)
    if _is_terminal(stream):
        return tqdm(iterable, dynamic_ncols=True, **common)
    common["file"] = _Lines(stream)
    return _LineBar(iterable, mininterval=_line_seconds(), maxinterval=float("inf"), miniters=1,
                    bar_format=LOG_FORMAT if total else LOG_FORMAT_NO_TOTAL, **common)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
