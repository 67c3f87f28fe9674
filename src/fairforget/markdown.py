"""Markdown for results: tables, a value with its 95% interval, p-values, image links relative to a page."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence


def ci_text(value: float | None, interval: Sequence[float] | None = None, digits: int = 2,
            signed: bool = False) -> str:
    """``value [low, high]``: ``n/a`` for a missing or NaN value, the value alone when the interval is missing
    (or has a bound JSON stored as null)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if interval is None or any(v is None for v in interval):
        return fmt.format(value)
    low, high = interval
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def p_text(value: float) -> str:
    return f"{value:.3g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells shown with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def image(path: Path | str, caption: str, folder: Path | str) -> str:
    """An image link relative to ``folder`` (the page's folder); empty when the file does not exist."""
    return f"![{caption}]({os.path.relpath(path, folder)})\n" if Path(path).is_file() else ""


def link(path: Path | str, text: str, folder: Path | str) -> str:
    return f"[{text}]({os.path.relpath(path, folder)})"


def pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """Each run against the one before it, and the last against the first."""
    chosen = list(zip(labels, labels[1:]))
    if len(labels) > 2:
        chosen.append((labels[0], labels[-1]))
    return chosen
