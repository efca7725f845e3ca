"""Batch segmentation: in-process vs a dask LocalCluster (issue 15).

Usage::

    python benchmarks/bench_batch.py [--images 40] [--slides 2] [--slide-size 4000x3000] [--workers 2]
                                     [--model unet-glands] [--data ../shared/data/glas]
    python benchmarks/bench_batch.py --split-slide [--slide-size 4000x3000] [--workers 2]

Segments the first ``--images`` GlaS training images (sorted by name) and ``--slides`` synthetic
whole-slide images (pyramidal TIFFs at 0.62 um/px: GlaS images placed on blank glass over a quarter
of the slide, built by ``bench_slide.py``'s writer, a different placement per slide) into two temporary
folders, once in this process (PyTorch using every core) and once on a LocalCluster of
``--workers`` processes with one thread each, both through :func:`glas_seg.backend.batch.run_batch`
(what ``glas-seg segment`` and ``glas-seg segment --workers N`` run). Prints the wall time of
each, the throughput ratio, and whether every label map is identical. The cluster's start-up
(spawning the workers, importing torch there) is timed apart from the run itself: the run's
first images pay for loading the model on each worker.

``--split-slide`` measures one slide split across the workers instead (``glas-seg segment
--workers N --split-slides``): one synthetic slide of ``--slide-size`` (no GlaS images as inputs;
the first 10 are its tissue), once in this process and once with its windows on a LocalCluster
of ``--workers`` processes, this process painting the store. Prints both wall times, their
ratio and whether the label TIFFs (and objects tables) are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from glas_seg.backend.batch import SegmentOptions, dask_client, read_manifest, remember_model, run_batch
from glas_seg.backend.registry import DEFAULT_MODEL, find_model, load_model
from glas_seg.backend.slide import is_slide, open_slide


def glas_images(data: Path, count: int) -> list[Path]:
    images = sorted(p for p in (data / "train").glob("*.bmp") if not p.stem.endswith("_anno"))
    return images[:count]


def synthetic_slides(folder: Path, image_paths: list[Path], count: int, size: str) -> list[Path]:
    """``count`` pyramidal TIFF slides of GlaS images on glass (bench_slide.py's writer)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_slide import placements, write_slide

    from glas_seg.backend.image_io import read_image

    height, width = (int(v) for v in size.lower().split("x"))
    pictures = [read_image(p)[..., :3] for p in image_paths]
    paths = []
    for k in range(count):
        path = folder / f"synthetic_slide_{k}.tif"
        write_slide(path, (height, width), pictures, placements((height, width), pictures, 0.25, seed=k))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--slide-size", default="4000x3000", help="HEIGHTxWIDTH in pixels")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "glas")
    parser.add_argument("--split-slide", action="store_true",
                        help="one synthetic slide split across --workers vs in-process (no images)")
    args = parser.parse_args()
    if args.split_slide:
        split_slide(args)
        return

    images = glas_images(args.data, args.images)
    entry = find_model(args.model)
    options = SegmentOptions(model_path=str(entry.path.resolve()), model_name=entry.name, device="cpu")
    results = {"images": len(images), "model": entry.name, "cpu_count": os.cpu_count(),
               "torch_threads_in_process": torch.get_num_threads(), "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        slides = synthetic_slides(Path(tmp), images[:10], args.slides, args.slide_size)
        inputs = [*images, *slides]
        jobs = [(p, f"{p.stem}_labels.tif") for p in inputs]
        results["slides"] = {"count": len(slides), "size": args.slide_size}
        here, there = Path(tmp) / "in_process", Path(tmp) / "cluster"
        summary, summary_c = in_process_and_on_dask(jobs, here, there, options, entry, args.workers, results, "cluster_s")
        assert not summary.failed and not summary_c.failed, (summary.failed, summary_c.failed)
        differ = [name for _, name in jobs
                  if not np.array_equal(tifffile.imread(here / name), tifffile.imread(there / name))]
        results["identical_outputs"] = not differ
        results["differing"] = differ
        results["throughput_ratio_cluster_vs_in_process"] = round(results["in_process_s"] / results["cluster_s"], 2)
        results["inputs_per_s"] = {"in_process": round(len(inputs) / results["in_process_s"], 3),
                                   "cluster": round(len(inputs) / results["cluster_s"], 3)}
        results["seconds_per_input"] = {
            name: {Path(k).name: v["seconds"]["total"] for k, v in read_manifest(folder)["inputs"].items()
                   if Path(k) in slides}
            for name, folder in (("in_process", here), ("cluster", there))}
    print(json.dumps(results, indent=1))


def in_process_and_on_dask(jobs, here: Path, there: Path, options, entry, workers: int, results: dict,
                           key: str, **batch_kwargs):
    """The same batch in this process (into ``here``) and on a LocalCluster of ``workers`` (into
    ``there``); wall times go to ``results`` (``in_process_s``, ``cluster_start_s``, ``key``)."""
    remember_model(options, load_model(entry.path, "cpu"))
    summary = run_batch(jobs, here, options)
    results["in_process_s"] = round(summary.wall_seconds, 1)
    started = time.perf_counter()
    with dask_client(workers=workers) as client:
        results["cluster_start_s"] = round(time.perf_counter() - started, 1)
        other = run_batch(jobs, there, options, client=client, executor=f"LocalCluster({workers})", **batch_kwargs)
    results[key] = round(other.wall_seconds, 1)
    return summary, other


def split_slide(args) -> None:
    """One slide in-process vs split across ``args.workers`` (run_batch with split_slides=True)."""
    entry = find_model(args.model)
    options = SegmentOptions(model_path=str(entry.path.resolve()), model_name=entry.name, device="cpu")
    results = {"model": entry.name, "cpu_count": os.cpu_count(), "torch_threads_in_process": torch.get_num_threads(),
               "workers": args.workers, "slide_size": args.slide_size}
    with tempfile.TemporaryDirectory() as tmp:
        [slide] = synthetic_slides(Path(tmp), glas_images(args.data, 10), 1, args.slide_size)
        if not is_slide(slide):
            raise SystemExit(f"a {args.slide_size} slide is written with one level: not a slide; give a larger --slide-size")
        jobs = [(slide, f"{slide.stem}_labels.tif")]
        here, there = Path(tmp) / "in_process", Path(tmp) / "split"
        summary, split = in_process_and_on_dask(jobs, here, there, options, entry, args.workers, results, "split_s",
                                                split_slides=True)
        assert not summary.failed and not split.failed, (summary.failed, split.failed)
        name = jobs[0][1]
        with open_slide(slide) as reader:  # chunks and windows, for the record
            results["slide_levels"] = [list(level.shape) for level in reader.levels]
        manifest = json.loads((there / f"{slide.stem}_labels.zarr" / "glas_seg_manifest.json").read_text())
        results["chunks_with_tissue"] = len(manifest["done"])
        results["objects"] = len(manifest["objects"])
        results["identical_outputs"] = bool(
            np.array_equal(tifffile.imread(here / name), tifffile.imread(there / name))
            and (here / f"{slide.stem}_objects.csv").read_text() == (there / f"{slide.stem}_objects.csv").read_text())
        results["speedup_split_vs_in_process"] = round(results["in_process_s"] / results["split_s"], 2)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
