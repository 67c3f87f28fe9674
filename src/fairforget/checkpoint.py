"""Resumable training: the full training state saved atomically every N steps, and resumed from the newest.

A state is the trainable parameters, the optimizer, the RNG states (Python, NumPy, torch CPU and CUDA; one
set per process in a multi-process run), the step and whatever the loop logs (``extra``), with a
fingerprint of the run's configuration. Each is a folder ``step-NNNNNNNN/`` (``state.pt`` and a readable
``meta.json``) written through :func:`fairforget.artifacts.atomic_dir`, so a run killed at any moment,
even by SIGKILL, leaves only complete states behind.

A loop resumes by replay: it runs its usual epochs and shuffles (seeded) but skips the steps already done
(:meth:`Checkpointer.done`), so data order, parameters, optimizer moments and RNG streams continue exactly
where the killed run was, and the result equals an uninterrupted run with the same seed:

    ckpt = Checkpointer(folder, every=10, fingerprint=config_dict)
    extra = ckpt.resume(model.named_parameters(), optimizer)   # {} on a fresh start
    for step, batch in enumerate(batches, start=1):
        if ckpt.done(step):
            continue
        ...train...
        ckpt.after_step(step, lambda: {"history": history})
    ...write the final result...
    ckpt.clear()
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from fairforget import distributed
from fairforget.artifacts import atomic_dir, sha256_text, write_json
from fairforget.errors import FairforgetError

STATE_FILE = "state.pt"
STEP_DIR = re.compile(r"step-(\d{8})")
KILL_ENV = "FAIRFORGET_KILL_AFTER_CHECKPOINT"  # test hook: SIGKILL this process right after saving step N


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and every CUDA device) as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint_of(config: Any) -> str:
    """A short hash of anything JSON-serialisable (the settings a checkpoint must agree with)."""
    return sha256_text(json.dumps(config, sort_keys=True, default=str))[:16]


def save_training_state(root: Path | str, step: int, params: dict[str, torch.Tensor], optimizer: Any = None,
                        extra: dict | None = None, fingerprint: str = "") -> Path:
    """Write ``root/step-NNNNNNNN/`` atomically (only rank 0 writes; every rank's RNG state is included)."""
    rngs = distributed.all_gather(rng_state())
    folder = Path(root) / f"step-{step:08d}"
    state = {"step": step, "fingerprint": fingerprint, "world_size": distributed.world_size(),
             "params": {name: p.detach().cpu().clone() for name, p in params.items()},
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "rng": rngs, "extra": extra or {}}
    with atomic_dir(folder, "training state") as tmp:
        torch.save(state, tmp / STATE_FILE)
        write_json(tmp / "meta.json", {"step": step, "fingerprint": fingerprint, "params": len(params),
                                       "world_size": state["world_size"]})
    return folder


def latest_checkpoint(root: Path | str) -> Path | None:
    """The newest complete ``step-*`` folder under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return max(steps, key=lambda p: p.name, default=None)


def load_training_state(folder: Path | str, params: dict[str, torch.Tensor], optimizer: Any = None) -> dict[str, Any]:
    """Copy a saved state into ``params`` (same names and shapes) and ``optimizer``; restore this process's
    RNG state; return the state (``step``, ``extra``, ``fingerprint``)."""
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it
        raise FairforgetError(f"training checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                              f"delete {Path(folder).parent} to start over") from exc
    saved = state["params"]
    if set(saved) != set(params):
        raise FairforgetError(f"training checkpoint {path} holds other parameters than this model "
                              f"({len(saved)} saved, {len(params)} trainable); delete {Path(folder).parent}")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise FairforgetError(f"training checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                                      f"the model {tuple(p.shape)}")
            p.copy_(saved[name].to(p.device, p.dtype))
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][min(distributed.rank(), len(state["rng"]) - 1)])
    return state


class Checkpointer:
    """Saves a loop's training state every ``every`` steps under ``folder`` and resumes from it.

    ``folder=None`` disables it: every method is then a no-op, so library loops can take a Checkpointer
    unconditionally. ``every=0`` saves only when :meth:`save` is called (e.g. at epoch ends).
    ``fingerprint`` identifies the run's settings: a checkpoint made with other settings is not resumed (it
    is removed, with a message).
    """

    def __init__(self, folder: Path | str | None, every: int = 0, fingerprint: Any = None, keep: int = 1,
                 log: Callable[[str], None] = print):
        self.folder = Path(folder) if folder is not None else None
        self.every = every
        self.fingerprint = fingerprint_of([fingerprint, distributed.world_size()])
        self.keep = max(1, keep)
        self.log = log
        self.step = 0
        self._params: dict[str, torch.Tensor] = {}
        self._optimizer: Any = None

    def resume(self, named_params: Iterable[tuple[str, torch.Tensor]], optimizer: Any = None) -> dict:
        """Bind the trainable parameters and optimizer; load the newest matching state if any. Returns its
        ``extra`` ({} on a fresh start); :attr:`step` is the step it was saved at."""
        self._params = dict(named_params)
        self._optimizer = optimizer
        if self.folder is None:
            return {}
        latest = latest_checkpoint(self.folder)
        if latest is None:
            return {}
        meta = json.loads((latest / "meta.json").read_text()) if (latest / "meta.json").is_file() else {}
        if meta.get("fingerprint") != self.fingerprint:
            self.log(f"ignoring the checkpoints in {self.folder}: they were made with other settings")
            if distributed.is_main():
                shutil.rmtree(self.folder, ignore_errors=True)
            distributed.barrier()
            return {}
        state = load_training_state(latest, self._params, optimizer)
        self.step = int(state["step"])
        self.log(f"resuming from {latest} (step {self.step})")
        return state["extra"]

    def done(self, step: int) -> bool:
        """Whether step number ``step`` (counted from 1) was trained before the resume: skip it."""
        return step <= self.step

    def after_step(self, step: int, extra: Callable[[], dict] | dict | None = None) -> None:
        """Save the state after ``step`` when it is a multiple of ``every``; keep the newest ``keep``."""
        if self.folder is None or not self.every or step % self.every:
            return
        self.save(step, extra() if callable(extra) else extra)

    def save(self, step: int, extra: dict | None = None) -> None:
        """Save the state after ``step`` now (e.g. at the end of an epoch)."""
        if self.folder is None:
            return
        save_training_state(self.folder, step, self._params, self._optimizer, extra, self.fingerprint)
        if distributed.is_main():
            old = sorted(p for p in self.folder.iterdir() if STEP_DIR.fullmatch(p.name))[:-self.keep]
            for path in old:
                shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(KILL_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def clear(self) -> None:
        """Remove the saved states (call once the final result is written)."""
        if self.folder is not None and distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
