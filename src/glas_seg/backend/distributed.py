"""Data-parallel training under ``torchrun``: torch's DistributedDataParallel, and a world-size-
independent stream of crops.

``torchrun --nproc-per-node N -m glas_seg.cli train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`setup` joins them in one process group (gloo on
the CPU, NCCL on CUDA GPUs, one GPU per process); :func:`wrap` wraps the network in
DistributedDataParallel, which averages gradients across processes after every backward pass.

Crops: the global batch of ``batch_size`` crops has one *slot* per crop, and slot ``j`` draws its
crops from its own random stream, seeded by (run seed + iteration at start, ``j``). Each process
draws only its own slots (:func:`rank_slots`), so the processes see different crops, the union
of their batches is the same global batch whatever the number of processes, and a run resumed
with another number of processes continues with the same batches it would have had. Checkpoints
are written by rank 0 only (:attr:`Context.is_main`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import GlasSegError

if TYPE_CHECKING:
    import torch

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands in a data-parallel run.

    Attributes
    ----------
    rank, world_size, local_rank : int
    device : torch.device
        This process's device (``cuda:LOCAL_RANK`` on GPUs).
    """

    rank: int
    world_size: int
    local_rank: int
    device: "torch.device"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints and reports progress."""
        return self.rank == 0


def launched_by_torchrun(environ=os.environ) -> bool:
    """True when ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set (torchrun, or by hand)."""
    return all(name in environ for name in ENV)


def _env_ints(environ) -> tuple[int, int, int]:
    try:
        rank, world, local = (int(environ[name]) for name in ENV)
    except ValueError:
        raise GlasSegError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, not "
                           f"{', '.join(repr(environ[n]) for n in ENV)}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise GlasSegError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def setup(device: "torch.device", environ=os.environ) -> Context | None:
    """Join the process group when launched by torchrun; None for a plain single process.

    Parameters
    ----------
    device : torch.device
        The device asked for (:func:`.registry.pick_device`); ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Returns
    -------
    Context or None

    Raises
    ------
    GlasSegError
        Inconsistent variables, or more processes on a machine than it has GPUs.
    """
    import torch
    import torch.distributed as dist

    if not launched_by_torchrun(environ):
        return None
    rank, world, local = _env_ints(environ)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise GlasSegError(f"process {local} on this machine has no GPU of its own "
                               f"({torch.cuda.device_count()} GPU(s)); use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise GlasSegError(f"multi-process training runs on CUDA GPUs or the CPU, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Context(rank, world, local, device)


def shutdown() -> None:
    """Leave the process group (at the end of a run; harmless when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(network: "torch.nn.Module", context: Context, find_unused: bool = False) -> "torch.nn.Module":
    """The network in DistributedDataParallel: rank 0's weights are broadcast to every process,
    gradients are averaged after each backward pass. Call it after loading any weights.

    ``find_unused``: let steps leave parameters without a gradient (detectors, whose heads
    may not all run on a batch); slower, so off for pixel networks, which use every parameter."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=ids, find_unused_parameters=find_unused)


def rank_slots(batch_size: int, context: Context) -> range:
    """The slots of the global batch this process draws: an equal, contiguous share.

    Raises
    ------
    GlasSegError
        ``batch_size`` is not a multiple of the number of processes.
    """
    if batch_size % context.world_size:
        raise GlasSegError(f"--batch-size {batch_size} (the global batch) must be a multiple of the number of "
                           f"processes ({context.world_size})")
    share = batch_size // context.world_size
    return range(context.rank * share, (context.rank + 1) * share)


def slot_seed(seed: int, slot: int) -> int:
    """An independent seed for one slot of the batch (numpy's SeedSequence spawning)."""
    return int(np.random.SeedSequence([int(seed), int(slot)]).generate_state(1)[0])


def slot_batches(dataset, slots: range, seed: int) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """Endless batches, one crop from each of ``slots``' streams per batch.

    Parameters
    ----------
    dataset : data.PatchDataset
        Template; each slot draws from ``dataset.reseeded(slot_seed(seed, slot))``.
    slots : range
        From :func:`rank_slots`.
    seed : int
        The run's seed plus the iteration the stream starts at (as the single-process path).

    Yields
    ------
    images : float32 tensor ``(len(slots), 3, crop, crop)``
    targets : int64 tensor ``(len(slots), crop, crop)``
    """
    from torch.utils.data import default_collate

    streams = [iter(dataset.reseeded(slot_seed(seed, slot))) for slot in slots]
    while True:
        yield default_collate([next(stream) for stream in streams])


__all__ = ["Context", "launched_by_torchrun", "setup", "shutdown", "wrap", "rank_slots", "slot_seed", "slot_batches"]
