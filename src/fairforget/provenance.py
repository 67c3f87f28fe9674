"""The provenance block every result carries: config, package versions, git commit, data sha256, time,
command line and process count (lm-evaluation-harness's results JSON is the model)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Iterable

from fairforget import distributed
from fairforget.artifacts import command_line, git_commit, package_versions, sha256_file
from fairforget.config import config_to_dict
from fairforget.datasets import pinned_files


def provenance(config: Any = None, data_files: Iterable[Path | str] = (), **extra: Any) -> dict[str, Any]:
    """The provenance block of a result: config, versions, git commit, data hashes, time, command line and
    the number of processes that computed it."""
    block: dict[str, Any] = {
        "fairforget_version": __import__("fairforget").__version__,
        "git_commit": git_commit(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "host": platform.node(),
        "processes": distributed.world_size(),
        "packages": package_versions(),
        "config": config_to_dict(config) if config is not None else None,
        "data_sha256": {str(p): sha256_file(p) for p in data_files},
        "data_custom": [str(p) for p in data_files if not pinned_files(p)],  # not pinned: only their sha256
    }
    block.update(extra)
    return block
