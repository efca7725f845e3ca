"""How many CPU threads torch gets: one rule for training, fine-tuning and inference.

PyTorch starts as many intra-op threads as there are *logical* CPUs. On a laptop with
hyper-threading, or on a machine where another process is already busy, that oversubscribes
the cores and every step waits on the slowest thread: on the project's 2-core machine, with one
other CPU-bound process running, a fine-tuning step took 2 s with 2 threads and far less with 1
(docs/benchmarks.md). So glas-seg picks the thread count itself, once per run:

1. ``GLAS_SEG_THREADS`` when set (the user's explicit choice), else ``OMP_NUM_THREADS`` when set;
2. otherwise the number of *physical* cores (psutil when installed, else half the logical
   CPUs) among the CPUs the process may use (its affinity: a container's or cluster job's
   cpuset), minus the cores other processes keep busy (the 1-minute load average, rounded), and
   at least 1.

On the CPU, data loading stays in the training process (``DataLoader(num_workers=0)``): worker
processes would compete with torch's threads for the same cores. On a GPU the cores are free
for it, and augmentation, not the GPU, sets the pace (:func:`loader_workers`).
"""

from __future__ import annotations

import os

from .errors import GlasSegError

ENV_VAR = "GLAS_SEG_THREADS"


def usable_cpus() -> int:
    """Logical CPUs this process may run on: its CPU affinity where the OS has one (a container's
    or a cluster job's cpuset, ``taskset``), else all of them; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads not counted) this process may use; at least 1.

    psutil counts the machine's cores; a process confined to fewer CPUs (container, cluster job)
    gets at most those.
    """
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is optional: half the logical CPUs is the usual ratio
        count = None
    count = count or (os.cpu_count() or 2) // 2
    return max(1, min(count, usable_cpus()))


def _env_threads() -> int | None:
    for name in (ENV_VAR, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            count = int(value)
        except ValueError:
            raise GlasSegError(f"{name}={value!r} is not a whole number of threads") from None
        if count < 1:
            raise GlasSegError(f"{name} must be at least 1, got {count}")
        return count
    return None


def busy_cores() -> int:
    """Cores other processes keep busy now: the 1-minute load average, rounded (0 if unknown)."""
    try:
        return int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):  # Windows has no load average
        return 0


def default_threads() -> int:
    """Thread count for the next run (see the module docstring for the rule)."""
    explicit = _env_threads()
    if explicit is not None:
        return explicit
    cores, usable = physical_cores(), usable_cpus()
    # The load average is the whole machine's: a process confined to some of its CPUs counts its share.
    busy = round(busy_cores() * usable / max(usable, os.cpu_count() or usable))
    return max(1, min(cores, usable - busy))


def use_torch_threads(count: int | None = None) -> int:
    """Set torch's intra-op thread count to ``count`` (default :func:`default_threads`).

    Call it where a run starts (training, fine-tuning, loading a model for inference), not in
    inner loops: the load average it reads includes this process once it is computing.

    Returns
    -------
    int
        The thread count set.
    """
    import torch

    count = default_threads() if count is None else int(count)
    if count < 1:
        raise GlasSegError(f"thread count must be at least 1, got {count}")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def loader_workers(device_type: str) -> int:
    """Data-loading processes for training on ``device_type`` ("cpu", "cuda", "mps").

    None on the CPU (see the module docstring). On a GPU, one per physical core left once the
    training process has its own, at most 8: augmenting a 256-px crop costs tens of
    milliseconds of CPU, so one process cannot feed a GPU that takes a few milliseconds a step.
    """
    if device_type == "cpu":
        return 0
    return max(0, min(8, physical_cores() - 1))
