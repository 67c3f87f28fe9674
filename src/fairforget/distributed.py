"""Several processes, one result: sharded evaluation and data-parallel training under torchrun / accelerate.

A stage that supports it calls :func:`init` first. Launched by ``torchrun --nproc_per_node N`` or
``accelerate launch --num_processes N`` (both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), it joins the
process group (gloo on CPU, NCCL on CUDA, each process on GPU ``LOCAL_RANK``); started plainly it does
nothing and every helper here is the identity.

Evaluation: the scoring loops give each process every ``world_size``-th batch of the single-process
batching (:func:`my_batches`) and collect every process's results (:func:`gather_batches`), so each
batch is exactly the batch one process would run and the scores are bitwise the same. Training: each
process takes a strided share of every global batch (:func:`shard`), the token count is summed over
processes (:func:`all_sum`) and the gradients too (:func:`sum_gradients`), which is one process's step.
Files: once the group is up only rank 0 renames its results into place (``fairforget.artifacts``).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Iterable, Sequence, TypeVar

T = TypeVar("T")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether this process is one of several in an initialised process group (torch is not imported here
    when nothing has imported it: then no group can exist)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, and in any process that is not part of an initialised group."""
    return rank() == 0


def init(device: str = "auto") -> bool:
    """Join the process group described by the launcher's environment; False (and nothing done) when the
    process was started alone. ``device`` is the stage's ``--device``: NCCL is used only for CUDA runs."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = _dist()
    if world <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    atexit.register(_finish)
    return True


def _finish() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], strided: bool = True) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th from ``rank`` (strided) or one contiguous
    block (block sizes differ by at most one). All of ``items`` when running alone."""
    n, r, w = len(items), rank(), world_size()
    if strided:
        return list(items[r::w])
    start = r * (n // w) + min(r, n % w)
    return list(items[start: start + n // w + (r < n % w)])


def my_batches(batches: Sequence[T]) -> list[T]:
    """The batches this process runs: every ``world_size``-th of the single-process batching."""
    return shard(batches, strided=True)


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (any picklable Python object), in rank order, on every process."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    _dist().all_gather_object(gathered, obj)
    return gathered


def gather_batches(done: list[tuple[Any, T]]) -> list[tuple[Any, T]]:
    """Every process's ``(batch indices, result)`` pairs, concatenated in rank order, on every process."""
    return [pair for part in all_gather(done) for pair in part]


def all_sum(value: Any) -> Any:
    """The sum of a tensor (or a number) over processes; returns the same type."""
    import torch

    if not active():
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.detach().clone()
    else:
        tensor = torch.tensor(float(value), dtype=torch.float64)
    moved = tensor.to(_collective_device())
    _dist().all_reduce(moved)
    if isinstance(value, torch.Tensor):
        return moved.to(value.device)
    return type(value)(moved.item())


def sum_gradients(params: Iterable[Any]) -> None:
    """Sum the ``.grad`` of ``params`` over processes in place (missing gradients count as zeros), in one
    flat all-reduce."""
    import torch

    if not active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params]).to(_collective_device())
    _dist().all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def barrier() -> None:
    if active():
        _dist().barrier()


def _collective_device() -> Any:
    import torch

    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
