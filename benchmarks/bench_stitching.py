"""What stitching Mask R-CNN's instances across tile borders costs in accuracy.

The bundled ``maskrcnn-glands`` model segments its validation images (the 17 GlaS images of
its patient-wise split) whole, and again cut into small overlapping tiles whose instances are
stitched by :mod:`glas_seg.backend.stitching`. With perfect stitching the scores would not
change; the drop is what tiling costs (objects cut at tile edges, seen twice, or merged).

Usage::

    python benchmarks/bench_stitching.py [--tiles 256 192 128] [--write-docs]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench_micronet_memory import wrap, write_section
from glas_seg.backend.data import dataset_split, load_sample
from glas_seg.backend.inference import segment
from glas_seg.backend.metrics import match_stack, object_scores
from glas_seg.backend.registry import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas"
SECTION = "## Mask R-CNN tile stitching"


def score(model, samples, tile_size: int) -> dict:
    matches, objects, seconds = [], 0, 0.0
    for sample in samples:
        start = time.process_time()
        labels = segment(model, sample.image, tile_size=tile_size).labels
        seconds += time.process_time() - start
        matches += match_stack(labels, sample.labels)
        objects += int(labels.max())
    return {**object_scores(matches), "objects": objects, "cpu_s": seconds / len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="maskrcnn-glands")
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 192, 128])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, "cpu")
    _, val_pairs = dataset_split(DATA)
    samples = [load_sample(*p) for p in val_pairs]
    truth = sum(int(len(np.unique(s.labels)) - 1) for s in samples)
    whole = max(max(s.image.shape[:2]) for s in samples)  # at scale <= 1 one tile covers every image
    rows = [("whole image (one tile)", score(model, samples, whole))]
    for tile in args.tiles:
        rows.append((f"tiles of {tile} px, overlap 0.25", score(model, samples, tile)))
    lines = [
        SECTION, "",
        f"`{args.model}` on the {len(samples)} validation images of its patient-wise GlaS split "
        f"({truth} ground-truth glands), segmented whole and cut into tiles (sizes in pixels at the "
        f"model's working scale {model.config.scale}) whose instances `backend/stitching.py` joins. "
        "Object F1 / Dice / Hausdorff pooled as in the GlaS challenge; CPU s per image, one thread. "
        f"Measured {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}, "
        "`python benchmarks/bench_stitching.py`.", "",
        "| inference | objects found | object F1 | object Dice | object Hausdorff | CPU s / image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['objects']} | {r['object_f1']:.3f} | {r['object_dice']:.3f} | "
                     f"{r['object_hausdorff']:.1f} | {r['cpu_s']:.2f} |")
    text = "\n".join(wrap(line) for line in lines) + "\n"
    print(text)
    if args.write_docs:
        write_section(text)


if __name__ == "__main__":
    main()
