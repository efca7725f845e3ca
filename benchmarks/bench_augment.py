"""Augmentation cost per training crop, with torchvision's elastic transform and with glas-seg's.

Usage::

    python benchmarks/bench_augment.py [--data ../shared/data/glas] [--crops 192 256 384]

One thread, one process: milliseconds per crop that :class:`~glas_seg.backend.data.PatchDataset`
yields (augmentation, glass edges as the default model trains, contour targets), the mean over
40 crops from 20 GlaS training images after one warm-up crop, for each crop size, first with
``torchvision.transforms.v2.ElasticTransform`` (what glas-seg used until 2026-11-26) and then
with :class:`~glas_seg.backend.augment.ElasticTransform` (same displacement field, smoothed with
scipy). Both in one run, so that their ratio is not blurred by a busy machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

from glas_seg.backend import augment
from glas_seg.backend.data import PatchDataset, dataset_split, load_sample

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas"


def ms_per_crop(samples, crop: int, crops: int = 40) -> float:
    stream = iter(PatchDataset(samples, crop, (0.5,) * 3, (0.5,) * 3, seed=0, contour_mode="inner",
                               glass=0.4, glass_fill=0.6))
    next(stream)
    start = time.process_time()
    for _ in range(crops):
        next(stream)
    return (time.process_time() - start) / crops * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--crops", type=int, nargs="+", default=[192, 256, 384])
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_pairs, _ = dataset_split(args.data)
    samples = [load_sample(*p) for p in train_pairs[:20]]
    ours = augment.ElasticTransform
    print("| crop | torchvision elastic: ms / crop | glas-seg elastic: ms / crop | ratio |")
    print("|---:|---:|---:|---:|")
    for crop in args.crops:
        augment.ElasticTransform = v2.ElasticTransform  # the Augmenter looks the class up when built
        before = ms_per_crop(samples, crop)
        augment.ElasticTransform = ours
        after = ms_per_crop(samples, crop)
        print(f"| {crop} | {before:.0f} | {after:.0f} | {before / after:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
