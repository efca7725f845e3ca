"""Batch segmentation: in-process vs a dask LocalCluster (issue 15).

Usage::

    python benchmarks/bench_batch.py [--images 40] [--workers 2] [--model unet-glands] [--data ../shared/data/glas]

Segments the first ``--images`` GlaS training images (sorted by name) into two temporary
folders, once in this process (PyTorch using every core) and once on a LocalCluster of
``--workers`` processes with one thread each, both through :func:`glas_seg.backend.batch.run_batch`
(what ``glas-seg segment`` and ``glas-seg segment --workers N`` run). Prints the wall time of
each, the throughput ratio, and whether every label map is identical. The cluster's start-up
(spawning the workers, importing torch there) is timed apart from the run itself: the run's
first images pay for loading the model on each worker.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from glas_seg.backend.batch import SegmentOptions, dask_client, remember_model, run_batch
from glas_seg.backend.registry import DEFAULT_MODEL, find_model, load_model


def glas_images(data: Path, count: int) -> list[Path]:
    images = sorted(p for p in (data / "train").glob("*.bmp") if not p.stem.endswith("_anno"))
    return images[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "glas")
    args = parser.parse_args()

    images = glas_images(args.data, args.images)
    jobs = [(p, f"{p.stem}_labels.tif") for p in images]
    entry = find_model(args.model)
    options = SegmentOptions(model_path=str(entry.path.resolve()), model_name=entry.name, device="cpu")
    results = {"images": len(images), "model": entry.name, "cpu_count": os.cpu_count(),
               "torch_threads_in_process": torch.get_num_threads(), "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        here, there = Path(tmp) / "in_process", Path(tmp) / "cluster"
        remember_model(options, load_model(entry.path, "cpu"))
        summary = run_batch(jobs, here, options)
        results["in_process_s"] = round(summary.wall_seconds, 1)
        started = time.perf_counter()
        with dask_client(workers=args.workers) as client:
            results["cluster_start_s"] = round(time.perf_counter() - started, 1)
            summary_c = run_batch(jobs, there, options, client=client, executor=f"LocalCluster({args.workers})")
        results["cluster_s"] = round(summary_c.wall_seconds, 1)
        assert not summary.failed and not summary_c.failed, (summary.failed, summary_c.failed)
        differ = [name for _, name in jobs
                  if not np.array_equal(tifffile.imread(here / name), tifffile.imread(there / name))]
        results["identical_outputs"] = not differ
        results["differing"] = differ
        results["throughput_ratio_cluster_vs_in_process"] = round(results["in_process_s"] / results["cluster_s"], 2)
        results["images_per_s"] = {"in_process": round(len(images) / results["in_process_s"], 2),
                                   "cluster": round(len(images) / results["cluster_s"], 2)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
