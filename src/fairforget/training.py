"""The skeleton every fairforget training loop shares: trainable parameters, seeded AdamW, shuffled batches
that skip the steps a resumed run has already done, and the per-step log."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from fairforget.checkpoint import Checkpointer
from fairforget.errors import FairforgetError
from fairforget.progress import progress


@dataclass
class StepLog:
    epoch: int
    step: int
    loss: float
    n_items: int  # tokens (language-model loss) or examples (answer loss) in the batch


@dataclass
class TrainingRun:
    """Parameters, optimizer and log of one training run, resumed from ``checkpoint`` where it has a state."""

    names: list[str]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    checkpoint: Checkpointer
    history: list[StepLog] = field(default_factory=list)

    def step(self, epoch: int, step: int, loss: float) -> None:
        """The optimizer step of a batch whose ``loss`` and gradients are computed. A non-finite loss, gradient
        or (after the step) weight stops training with one FairforgetError, before the step is logged or saved:
        the last saved state stays the one a run resumes from, and no model is written."""
        if not math.isfinite(loss):
            raise self._stopped(epoch, step, f"the loss is {loss}")
        bad = _first_nonfinite(self.names, [p.grad for p in self.params])
        if bad:
            raise self._stopped(epoch, step, f"the gradient of {bad} is not finite")
        self.optimizer.step()
        bad = _first_nonfinite(self.names, self.params)
        if bad:
            raise self._stopped(epoch, step, f"the update made {bad} non-finite")

    def _stopped(self, epoch: int, step: int, what: str) -> FairforgetError:
        kept = (f"the last saved state in {self.checkpoint.folder} is kept" if self.checkpoint.folder is not None
                else "nothing was saved")
        return FairforgetError(f"training stopped at epoch {epoch}, step {step}: {what} (lower --lr); {kept}")

    def log(self, entry: StepLog) -> None:
        """Record a finished step and let the checkpointer save the state when it is due."""
        self.history.append(entry)
        self.checkpoint.after_step(entry.step, lambda: {"history": [vars(h) for h in self.history]})


def start_training(model: Any, lr: float, weight_decay: float, seed: int,
                   checkpoint: Checkpointer | None) -> TrainingRun:
    """AdamW over ``model``'s trainable parameters, torch seeded, state and log restored from ``checkpoint``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise FairforgetError("the model has no trainable parameters")
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    checkpoint = checkpoint or Checkpointer(None)
    history = [StepLog(**h) for h in checkpoint.resume(named, optimizer).get("history", [])]
    model.train()
    return TrainingRun([n for n, _ in named], params, optimizer, checkpoint, history)


def _first_nonfinite(names: list[str], tensors: list[torch.Tensor | None]) -> str | None:
    """The name of the first tensor holding a NaN or infinity (None: all finite; a missing gradient is fine)."""
    return next((name for name, t in zip(names, tensors) if t is not None and not torch.isfinite(t).all()), None)


def step_bar(run: TrainingRun, total_steps: int, desc: str) -> Any:
    """A progress bar over a run's ``total_steps`` steps, starting at those a resumed run has already done;
    set its postfix (e.g. the loss), then ``update(1)`` after each step."""
    return progress(total=total_steps, initial=min(len(run.history), total_steps), desc=desc, unit="step")


def shuffled_batches(n_items: int, epochs: int, batch_size: int, seed: int,
                     checkpoint: Checkpointer) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, step, item indices) for each step not yet done; the order is reshuffled each epoch (seeded)."""
    rng = random.Random(seed)
    step = 0
    for epoch in range(1, epochs + 1):
        order = list(range(n_items))
        rng.shuffle(order)
        for start in range(0, n_items, batch_size):
            step += 1
            if not checkpoint.done(step):
                yield epoch, step, order[start: start + batch_size]
