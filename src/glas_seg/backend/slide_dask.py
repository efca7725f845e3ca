"""One slide split across the workers of a dask cluster (``glas-seg segment --split-slides``).

:func:`.slide_segment.segment_slide` with a ``client`` keeps the label store, the manifest and
the painting in its own process and sends only the reading and segmenting of windows to the
workers (:func:`.slide_segment.segment_window`). A window's result depends only on the slide,
the model and the window, so painting the results in chunk order, as the in-process run does,
gives the same store byte for byte. Jobs are small (a path and numbers): each worker reads its
window from the slide itself (at the same path: a shared file system on a cluster) and uses the
model it loaded once and keeps (:func:`.batch.cached_model`).

Memory stays bounded on both sides: at most :data:`IN_FLIGHT_PER_THREAD` windows per worker
thread are submitted and not yet painted, and this process holds one window's result at a time.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import GlasSegError
from .progress import CancelToken, raise_if_cancelled

__all__ = ["IN_FLIGHT_PER_THREAD", "driver_model", "segment_window_task", "segment_windows_on_dask"]

#: Windows submitted and not yet painted, per worker thread: two keep every worker busy while
#: this process paints, without piling up results (each up to ~26 MB) on the workers.
IN_FLIGHT_PER_THREAD = 2
#: Seconds between looks at the cancel token while waiting for a window.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ModelHeader:
    """Stands in for a LoadedModel in the process that only paints: ``config`` and nothing else."""

    config: object


def driver_model(model, worker_options, device: str = "auto"):
    """The model as this process needs it, and how the workers load theirs.

    Parameters
    ----------
    model : str, Path or LoadedModel
    worker_options : batch.SegmentOptions or None
    device : str
        The workers' device when ``worker_options`` is derived from a name or path.

    Returns
    -------
    model : LoadedModel or ModelHeader
        A name or path is read as its header only: the weights are loaded on the workers.
    worker_options : batch.SegmentOptions

    Raises
    ------
    GlasSegError
        A loaded model without ``worker_options`` (the workers cannot be sent its file).
    """
    from .batch import SegmentOptions
    from .checkpoint import read_config

    if isinstance(model, (str, Path)):
        from .registry import find_model

        entry = find_model(model)
        if worker_options is None:
            worker_options = SegmentOptions(model_path=str(entry.path.resolve()), model_name=entry.name,
                                            device=device)
        return ModelHeader(entry.config), worker_options
    if worker_options is None:
        raise GlasSegError("to split a slide across dask workers, give the model as a name or file path "
                           "(each worker loads it), or give worker_options")
    return (model if hasattr(model, "config") else ModelHeader(read_config(worker_options.model_path))), worker_options


def segment_window_task(options, job):
    """On a worker: read and segment one window with this process's cached model.

    Parameters
    ----------
    options : batch.SegmentOptions
        Names the model file, device and mode (only these are used).
    job : slide_segment.WindowJob

    Returns
    -------
    slide_segment.WindowResult
    """
    from .batch import cached_model
    from .slide import open_slide
    from .slide_segment import release_memory, segment_window

    model = cached_model(options)
    # Opened per window: milliseconds next to segmenting it, and no file handle shared between
    # a worker's threads.
    with open_slide(job.slide) as reader:
        result = segment_window(model, reader, job)
    release_memory()  # as the in-process run does after each window: a worker lives for many windows
    return result


def segment_windows_on_dask(client, options, jobs: list, *, cancel: CancelToken = None,
                            in_flight: int | None = None) -> Iterator:
    """Segment ``jobs`` on the workers of ``client``; yield the results in the order of ``jobs``.

    Parameters
    ----------
    client : distributed.Client
    options : batch.SegmentOptions
        How the workers load the model.
    jobs : list of slide_segment.WindowJob
    cancel : threading.Event or callable, optional
        Checked while waiting; :class:`.progress.Cancelled` is raised.
    in_flight : int, optional
        Most windows submitted and not yet yielded (default: :data:`IN_FLIGHT_PER_THREAD` per
        worker thread of the cluster when the call starts).

    Yields
    ------
    slide_segment.WindowResult
        In the order of ``jobs``; a window that failed on its worker raises its error here.
        Closing the generator (an error or a cancel in the caller) cancels the windows not
        yet yielded.
    """
    from distributed import wait

    if in_flight is None:
        threads = sum(client.nthreads().values())
        in_flight = IN_FLIGHT_PER_THREAD * max(1, threads)
    queue: collections.deque = collections.deque()
    upcoming = iter(jobs)
    try:
        while True:
            for job in upcoming:  # top up to in_flight (the for loop resumes where it stopped)
                queue.append(client.submit(segment_window_task, options, job, pure=False))
                if len(queue) >= in_flight:
                    break
            if not queue:
                return
            head = queue.popleft()
            while True:  # wait for the oldest window, looking at the cancel token now and then
                raise_if_cancelled(cancel)
                try:
                    wait([head], timeout=POLL_SECONDS)
                    break
                except TimeoutError:  # (distributed raises the builtin one when time is up)
                    continue
            result = head.result()
            del head  # release it on the worker before the next one is submitted
            yield result
    finally:
        if queue:
            client.cancel(list(queue))
