"""Content hashes of files and folders (the pipeline's skip-if-done records, the held-out suite's score cache)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from fairforget.artifacts import sha256_file
from fairforget.layout import LIBRARY

class Hasher:
    """sha256 of files and folders, cached by (path, size, mtime) for the length of a run."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = sha256_file(path)
        return self._cache[key]

    def path(self, path: Path) -> str | None:
        """A file's sha256; a folder's: sha256 of its non-hidden files' relative names and hashes; None if absent."""
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return None
        return self._folder(path, lambda relative: not any(part.startswith(".") for part in relative.parts))

    def library(self) -> str:
        """sha256 of the fairforget package's code and data (``.py``, ``.c``, ``.json``; no caches)."""
        return self._folder(LIBRARY, lambda relative: relative.suffix in (".py", ".c", ".json")
                            and "__pycache__" not in relative.parts)

    def _folder(self, root: Path, keep: Callable[[Path], bool]) -> str:
        """sha256 of the relative names and hashes of the files under ``root`` that ``keep`` accepts."""
        digest = hashlib.sha256()
        for item in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = item.relative_to(root)
            if keep(relative):
                digest.update(f"{relative.as_posix()}\0{self.file(item)}\n".encode())
        return digest.hexdigest()
