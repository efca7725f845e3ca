"""Seconds to score a GlaS-sized test part: 80 images of 775x522 with ~15 objects each.

Usage: python benchmarks/bench_metrics.py [--images 80] [--repeats 3] [--glas ../shared/data/glas]

Rows printed (Markdown), each the minimum over ``--repeats`` of **CPU s** (``time.process_time``,
which does not grow when other processes compete for the cores) and *(wall s)*:

* ``object metrics``: :func:`match_objects` of every image, then the pooled challenge scores;
* ``full report``: :func:`score_set`, what ``glas-seg evaluate`` does after reading the files
  (object + pixel metrics, per image, pooled and mean);
* ``full report + ROC``: the same with a float32 probability map per image (pooled ROC over
  all 32 M pixels);
* ``GlaS annotations``: the real GlaS training annotations (when ``--glas`` exists) against
  a degraded copy (shifted 4 px, grown 2 px), 775x522 images only.

Synthetic images: ~15 ellipses per image (9 to 21); the prediction moves each by up to 4 px,
grows or shrinks it by up to 3 px, merges one touching pair, misses one and adds two false blobs,
so that every code path (matched, split, merged, unmatched with nearest search) is exercised.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from skimage.draw import ellipse
from skimage.segmentation import expand_labels

from glas_seg.backend.metrics import match_objects, object_scores
from glas_seg.backend.metrics_report import score_set

SHAPE = (522, 775)


def synthetic_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros(SHAPE, np.int32)
    pred = np.zeros(SHAPE, np.int32)
    n = int(rng.integers(9, 22))
    for i in range(1, n + 1):
        r, c = rng.integers(40, SHAPE[0] - 40), rng.integers(40, SHAPE[1] - 40)
        a, b = rng.integers(12, 45, size=2)
        angle = rng.uniform(0, np.pi)
        gt[ellipse(r, c, a, b, SHAPE, angle)] = i
        if i == n:  # missed gland
            continue
        dr, dc = rng.integers(-4, 5, size=2)
        grow = int(rng.integers(-3, 4))
        pred[ellipse(r + dr, c + dc, max(a + grow, 3), max(b + grow, 3), SHAPE, angle)] = i
    ids = np.unique(pred)[1:]
    if ids.size > 2:  # merge one pair of neighbours after growing them together
        grown = expand_labels(pred, 8)
        first = ids[0]
        touching = np.unique(grown[(expand_labels(np.where(grown == first, first, 0), 1) > 0) & (grown != first)])
        touching = touching[touching > 0]
        if touching.size:
            pred[pred == touching[0]] = first
    for k in range(2):  # false blobs
        r, c = rng.integers(20, SHAPE[0] - 20), rng.integers(20, SHAPE[1] - 20)
        pred[ellipse(r, c, 8, 10, SHAPE)] = 1000 + k
    return pred, gt


def glas_pairs(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from glas_seg.backend.image_io import read_labels

    pairs = []
    for path in sorted((root / "train").glob("*_anno.bmp")):
        gt = read_labels(path)
        if gt.shape == SHAPE:
            pairs.append((expand_labels(np.roll(gt, 4, axis=1), 2), gt))
    return pairs


def timed(fn, repeats: int) -> tuple[float, float]:
    best_cpu, best_wall = np.inf, np.inf
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - cpu), min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--glas", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glas"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    pairs = [synthetic_pair(rng) for _ in range(args.images)]
    probs = [np.clip((gt > 0) * 0.7 + rng.normal(0.15, 0.2, SHAPE), 0, 1).astype(np.float32) for _, gt in pairs]
    n_obj = np.mean([len(np.unique(gt)) - 1 for _, gt in pairs])
    rows = {
        "object metrics": lambda: object_scores([match_objects(p, g) for p, g in pairs]),
        "full report": lambda: score_set([(str(i), p, g) for i, (p, g) in enumerate(pairs)]),
        "full report + ROC": lambda: score_set([(str(i), p, g, q) for i, ((p, g), q) in enumerate(zip(pairs, probs))]),
    }
    load = os.getloadavg()[0]
    print(f"{args.images} synthetic images {SHAPE[1]}x{SHAPE[0]}, {n_obj:.1f} ground-truth objects per image; "
          f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}")
    pooled = object_scores([match_objects(p, g) for p, g in pairs])
    print(f"pooled synthetic scores: F1 {pooled['object_f1']:.3f}, object Dice {pooled['object_dice']:.3f}, "
          f"object Hausdorff {pooled['object_hausdorff']:.1f}")
    print("\n| workload | images | CPU s | (wall s) | CPU ms / image |\n|---|---:|---:|---:|---:|")
    for name, fn in rows.items():
        cpu, wall = timed(fn, args.repeats)
        print(f"| {name} | {len(pairs)} | {cpu:.2f} | ({wall:.2f}) | {1000 * cpu / len(pairs):.0f} |")
    root = Path(args.glas)
    if root.is_dir():
        real = glas_pairs(root)
        cpu, wall = timed(lambda: object_scores([match_objects(p, g) for p, g in real]), args.repeats)
        print(f"| GlaS annotations, object metrics | {len(real)} | {cpu:.2f} | ({wall:.2f}) | {1000 * cpu / len(real):.0f} |")
    print(f"\nload average after the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
