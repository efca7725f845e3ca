"""Segmenting many images: in this process, on a local dask cluster, or on a running dask scheduler.

One image or one whole-slide image is the unit of work. :func:`segment_one` reads an image,
segments it and writes its label map atomically (a slide goes through
:func:`.slide_segment.segment_slide`, chunk by chunk, and gets the files of ``glas-seg
segment-slide``); it never raises for a bad input but returns a record (done, or failed with the
message), so one bad file fails alone. It runs in this process or on dask.distributed workers,
where each worker process loads the model once and keeps it (:func:`cached_model`, keyed by the
model file, device and mode).

With ``split_slides`` (``glas-seg segment --split-slides``) and a dask client, a slide is not one
unit of work but is split across all the workers: this process (the driver) segments the slides
one after the other, each with :func:`.slide_segment.segment_slide` given the client, which sends
the slide's windows to the workers and paints the results into the store here, in chunk order,
so that the outputs are identical to an unsplit run (:mod:`.slide_dask`). Images are still one
task each, and go to the workers first. It pays off when a cohort has fewer slides than workers
(one big slide would otherwise keep one worker busy and leave the others idle).

A JSON manifest in the output folder (:data:`MANIFEST_NAME`) records per input its state
(``pending``, ``done``, ``failed`` with the message), its output files, the number of objects,
timings and the worker. Only this process (the driver) writes it, atomically, after results
arrive (at most once a second, and always at the end), so a run killed at any moment leaves a
readable manifest; re-running the same command skips inputs recorded done whose output is
still there. The manifest also records the settings (model file hash, tile size, overlap, TTA,
minimum size, mode): when they change, every input is segmented again.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import atomic_write, file_sha256
from .errors import GlasSegError

MANIFEST_NAME = "glas_seg_batch.json"
MANIFEST_VERSION = 1
WRITE_INTERVAL = 1.0  # seconds between manifest rewrites while results stream in


@dataclass(frozen=True)
class SegmentOptions:
    """Everything a worker needs to segment one image the way the command asked (picklable).

    Attributes
    ----------
    model_path : str
        The model file, resolved on the driver: workers do not look names up in their own
        model store (on a cluster the file must be on a shared file system).
    model_name : str
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``... as seen by each worker.
    mode : str or None
    tile_size : int or None
    overlap : float
    tta : bool
    min_size : int or None
    mask_glass : bool
        Keep blank glass at the image border background (:func:`.inference.segment`).
    """

    model_path: str
    model_name: str
    device: str = "auto"
    mode: str | None = None
    tile_size: int | None = None
    overlap: float = 0.25
    tta: bool = False
    min_size: int | None = None
    mask_glass: bool = True

    def fingerprint(self, model_sha256: str) -> dict:
        """The settings that change a result (the device does not, beyond rounding)."""
        return {"model_sha256": model_sha256, "model": self.model_name, "mode": self.mode,
                "tile_size": self.tile_size, "overlap": self.overlap, "tta": self.tta, "min_size": self.min_size,
                "mask_glass": self.mask_glass}


# -- on a worker --------------------------------------------------------------------------------
_MODELS: dict[tuple, object] = {}  # per process: one dask worker process keeps its model here
MODELS_KEPT = 2  # a long-lived worker serving several cohorts keeps only the latest models


def _worker_threads() -> int | None:
    """Threads the dask worker running this task was given, or None outside dask."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def _model_key(options: SegmentOptions) -> tuple:
    # The file's size and modification time too: a worker of a long-lived cluster must not keep
    # serving a model whose file was replaced since (same path, new weights).
    stat = os.stat(options.model_path)
    return (options.model_path, stat.st_size, stat.st_mtime_ns, options.device, options.mode)


def remember_model(options: SegmentOptions, model) -> None:
    """Use an already loaded model for ``options`` in this process (the in-process path loads
    it once up front, to fail early on a damaged file)."""
    _MODELS.pop(_model_key(options), None)
    while len(_MODELS) >= MODELS_KEPT:
        _MODELS.pop(next(iter(_MODELS)))
    _MODELS[_model_key(options)] = model


def cached_model(options: SegmentOptions):
    """The model of ``options``, loaded once per process and kept (a LoadedModel)."""
    key = _model_key(options)
    if key not in _MODELS:
        from .registry import load_model

        threads = _worker_threads()
        if threads is not None:
            import torch

            # One torch thread per dask thread: N worker processes each using every core
            # would oversubscribe the machine many times over.
            torch.set_num_threads(threads)
        while len(_MODELS) >= MODELS_KEPT:
            _MODELS.pop(next(iter(_MODELS)))  # the oldest first (dicts keep insertion order)
        _MODELS[key] = load_model(options.model_path, options.device, mode=options.mode)
    return _MODELS[key]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    # User errors speak for themselves; anything else is named so that it can be reported.
    return text if isinstance(exc, (ValueError, OSError)) and text else f"{type(exc).__name__}: {text}"


def _segment_slide(model, slide_path: str, target: Path, options: SegmentOptions,
                   client=None) -> tuple[list[str], int]:
    """One slide -> ``<stem>_labels.zarr`` (resumable chunk store), ``<stem>_labels.tif`` (pyramid),
    ``<stem>_objects.geojson`` and ``<stem>_objects.csv`` next to ``target``; the files
    ``glas-seg segment-slide`` writes. With a dask ``client`` its windows are segmented on the
    workers (:mod:`.slide_dask`). Returns (output paths, number of objects)."""
    from .slide import open_slide
    from .slide_export import export_objects, write_labels_tiff
    from .slide_segment import open_labels, segment_slide

    stem = target.name[: -len("_labels.tif")] if target.name.endswith("_labels.tif") else target.stem
    folder = target.parent
    with open_slide(slide_path) as reader:
        result = segment_slide(model, reader, folder / f"{stem}_labels.zarr", min_size=options.min_size,
                               mask_glass=options.mask_glass, tile_size=options.tile_size, overlap=options.overlap,
                               tta=options.tta, client=client, worker_options=options)
    levels = open_labels(result.store)
    tiff = write_labels_tiff(levels, target, result.mpp)
    geojson, table = folder / f"{stem}_objects.geojson", folder / f"{stem}_objects.csv"
    export_objects(levels[0], result.objects, mpp=result.mpp, origin=result.origin, task=model.config.task,
                   geojson=geojson, csv_path=table)
    return [str(result.store), str(tiff), str(geojson), str(table)], len(result.objects)


def segment_one(image_path: str, target: str, options: SegmentOptions, client=None) -> dict:
    """Segment one image (or slide) and write ``target`` (int32 TIFF) atomically; runs on any worker.

    With a dask ``client`` (in the driver only), a slide is split across the client's workers
    and this process loads only the model's header; an image is segmented here as without one.

    Returns
    -------
    dict
        ``state`` (``"done"`` or ``"failed"``), ``outputs`` (list of str), ``objects`` (int),
        ``replaced`` (an existing file was overwritten), ``message`` (failed only),
        ``seconds`` (``load``, ``read``, ``segment``, ``write``, ``total``), ``worker``.
        Never raises for a bad image, model or output path: the failure is the record.
    """
    import tifffile

    from .image_io import read_image
    from .inference import segment
    from .outputs import write_file
    from .slide import is_slide

    seconds: dict[str, float] = {}
    started = last = time.perf_counter()
    record: dict = {"worker": f"{socket.gethostname()}:{os.getpid()}", "outputs": []}

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[name] = round(now - last, 4)
        last = now

    try:
        slide = is_slide(image_path)
        if slide and client is not None:
            from .slide_dask import driver_model

            model = driver_model(options.model_path, options)[0]  # the weights are the workers' business
        else:
            model = cached_model(options)
        lap("load")
        target_path = Path(target)
        replaced = target_path.is_file()
        if slide:
            outputs, objects = _segment_slide(model, image_path, target_path, options, client)
            lap("segment")
            record.update(state="done", outputs=outputs, objects=objects, replaced=replaced, slide=True)
            if client is not None:
                record["split_across"] = len(client.nthreads())
        else:
            image = read_image(image_path)
            lap("read")
            result = segment(model, image, min_size=options.min_size, tile_size=options.tile_size,
                             overlap=options.overlap, tta=options.tta, mask_glass=options.mask_glass)
            lap("segment")
            write_file(target_path, lambda tmp: tifffile.imwrite(tmp, result.labels, compression="zlib"), "label map")
            lap("write")
            record.update(state="done", outputs=[str(target_path)], objects=int(result.labels.max()), replaced=replaced)
    except Exception as exc:  # noqa: BLE001 -- one bad input fails alone, whatever the cause
        record.update(state="failed", message=_one_line(exc))
    seconds["total"] = round(time.perf_counter() - started, 4)
    record["seconds"] = seconds
    return record


# -- the manifest (driver only) ------------------------------------------------------------------
def read_manifest(out: Path) -> dict | None:
    """The manifest in ``out``, or None when there is none or it cannot be read (then the run
    starts afresh: label maps are rewritten, never half-written, so redoing is safe)."""
    path = Path(out) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION
    return manifest if ok and isinstance(manifest.get("inputs"), dict) else None


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(Path(out) / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def plan(manifest: dict | None, settings: dict, jobs: list[tuple[str, str]], out: Path) -> tuple[dict, list, list]:
    """Which inputs still need work.

    Parameters
    ----------
    manifest : dict or None
        The manifest found in ``out``.
    settings : dict
        :meth:`SegmentOptions.fingerprint` of this run.
    jobs : list of (input path, output file name)

    Returns
    -------
    manifest : dict
        Updated: every job present, pending unless done with its output on disk; all entries
        pending when ``settings`` differ from the manifest's.
    todo : list of (input, output name)
    skipped : list of input paths already done
    """
    fresh = {"version": MANIFEST_VERSION, "settings": settings, "inputs": {}, "runs": []}
    if manifest is None:
        manifest = fresh
    elif manifest.get("settings") != settings:
        fresh["runs"] = manifest.get("runs", [])
        fresh["settings_changed"] = True
        manifest = fresh
    entries = manifest["inputs"]
    todo, skipped = [], []
    for image, name in jobs:
        entry = entries.get(image)
        done = (entry is not None and entry.get("state") == "done" and entry.get("output") == name
                and all(Path(p).exists() for p in entry.get("outputs", [])) and (out / name).is_file())
        if done:
            skipped.append(image)
        else:
            entries[image] = {"output": name, "state": "pending"}
            todo.append((image, name))
    return manifest, todo, skipped


# -- executors -----------------------------------------------------------------------------------
@contextlib.contextmanager
def dask_client(cluster: str | None = None, workers: int | None = None, timeout: str = "20s") -> Iterator[object]:
    """A dask.distributed Client: to the scheduler at ``cluster``, or to a new LocalCluster of
    ``workers`` processes (one thread each) that is shut down afterwards. ``timeout``: how long
    to try reaching the scheduler.

    Raises
    ------
    GlasSegError
        Both or neither given, ``workers`` < 1, distributed not installed, scheduler unreachable.
    """
    if (cluster is None) == (workers is None):
        raise GlasSegError("give either a scheduler address (--cluster) or a number of local workers (--workers)")
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise GlasSegError("--cluster and --workers need dask.distributed: pip install distributed") from None
    if cluster is not None:
        try:
            client = Client(cluster, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise GlasSegError(f"cannot reach the dask scheduler at {cluster} ({_one_line(exc)}); "
                               "start one with `dask scheduler` or give its tcp://host:8786 address") from None
        with client:
            yield client
        return
    if not isinstance(workers, int) or workers < 1:
        raise GlasSegError(f"--workers must be a positive number of processes, not {workers!r}")
    import logging

    # Processes, not threads: the GIL and torch's own thread pools make threads a poor fit.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as local, Client(local) as client:
        yield client


def _in_process(todo: list[tuple[str, str]], out: Path, options: SegmentOptions) -> Iterator[tuple[str, dict]]:
    for image, name in todo:
        yield image, segment_one(image, str(out / name), options)


def _on_dask(client, todo: list[tuple[str, str]], out: Path, options: SegmentOptions) -> Iterator[tuple[str, dict]]:
    from distributed import as_completed

    futures = {client.submit(segment_one, image, str(out / name), options, pure=False): image
               for image, name in todo}
    try:
        for future in as_completed(futures):
            image = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # noqa: BLE001 -- e.g. KilledWorker: the worker died on this input
                record = {"state": "failed", "message": _one_line(exc), "outputs": [], "seconds": {}}
            yield image, record
    finally:
        client.cancel(list(futures))  # on Ctrl-C or an error here, leave nothing running


def _on_dask_split(client, todo: list[tuple[str, str]], out: Path,
                   options: SegmentOptions) -> Iterator[tuple[str, dict]]:
    """Images one task each on the workers, then each slide split across all of them.

    The images come first so that their results (quick, many) are recorded early; the slides
    then run one at a time, each using every worker (:func:`segment_one` with the client).
    """
    from .slide import is_slide

    slides = [(image, name) for image, name in todo if is_slide(image)]
    images = [job for job in todo if job not in slides]
    yield from _on_dask(client, images, out, options)
    for image, name in slides:
        yield image, segment_one(image, str(out / name), options, client=client)


@dataclass
class BatchSummary:
    """What a batch run did: input paths per outcome, and where the manifest is."""

    done: list
    failed: list  # (input, message)
    skipped: list  # already done according to the manifest
    replaced: list  # output files that existed and were overwritten
    manifest: Path
    settings_changed: bool
    wall_seconds: float


def run_batch(
    jobs: list[tuple[str | Path, str]],
    out: str | Path,
    options: SegmentOptions,
    *,
    client=None,
    executor: str = "in-process",
    split_slides: bool = False,
    on_result: Callable[[str, dict], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Segment ``jobs`` into ``out``, skipping what the manifest there records as done.

    Parameters
    ----------
    jobs : list of (image path, output file name)
    out : path
        Output folder (already checked writable); holds the manifest.
    options : SegmentOptions
    client : distributed.Client, optional
        Send the work to its cluster; None runs here, one image after the other.
    executor : str
        How the run is described in the manifest (``"in-process"``, ``"LocalCluster(2)"``, an address).
    split_slides : bool
        With ``client``: split each slide across all the workers instead of giving it to one
        (the outputs are the same; see the module's docstring). Ignored without a client.
    on_result : callable(input, record), optional
        Called in this process as each result arrives (progress bars, messages).
    on_plan : callable(to_do, already_done), optional
        Called once the manifest has been read.

    Returns
    -------
    BatchSummary
    """
    out = Path(out)
    started = time.perf_counter()
    jobs = [(str(Path(image).resolve()), name) for image, name in jobs]
    settings = options.fingerprint(file_sha256(options.model_path))
    manifest, todo, skipped = plan(read_manifest(out), settings, jobs, out)
    for _, name in todo:  # temporary files of a run killed while writing (atomic_write's names)
        for stale in out.glob(f".{glob.escape(name)}.*.part"):
            stale.unlink(missing_ok=True)
    settings_changed = bool(manifest.pop("settings_changed", False))
    run = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "executor": executor,
           "split_slides": bool(split_slides and client is not None),
           "inputs": len(jobs), "already_done": len(skipped), "done": 0, "failed": 0}
    manifest["runs"].append(run)
    write_manifest(out, manifest)
    if on_plan is not None:
        on_plan(len(todo), len(skipped))
    summary = BatchSummary([], [], skipped, [], out / MANIFEST_NAME, settings_changed, 0.0)
    if client is None:
        results = _in_process(todo, out, options)
    elif split_slides:
        results = _on_dask_split(client, todo, out, options)
    else:
        results = _on_dask(client, todo, out, options)
    last_write = -float("inf")  # the first result is recorded at once, later ones at most once a second
    try:
        for image, record in results:
            entry = manifest["inputs"][image]
            entry.update(record)
            entry["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if record["state"] == "done":
                summary.done.append(image)
                if record.get("replaced"):
                    summary.replaced.append(record["outputs"][0])
            else:
                summary.failed.append((image, record.get("message", "")))
            run["done"], run["failed"] = len(summary.done), len(summary.failed)
            if on_result is not None:
                on_result(image, record)
            if time.monotonic() - last_write >= WRITE_INTERVAL:
                write_manifest(out, manifest)
                last_write = time.monotonic()
    finally:
        summary.wall_seconds = time.perf_counter() - started
        run["wall_seconds"] = round(summary.wall_seconds, 2)
        write_manifest(out, manifest)  # also when interrupted: what is done stays done
    return summary


__all__ = ["MANIFEST_NAME", "SegmentOptions", "segment_one", "cached_model", "remember_model", "run_batch", "dask_client",
           "read_manifest", "plan", "BatchSummary"]
