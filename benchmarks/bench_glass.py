"""Glands at a tissue edge (issue 16): the validation images placed on blank glass.

Usage::

    python benchmarks/bench_glass.py [MODEL ...] [--margin 300]

For each model, the patient-wise GlaS validation images are segmented as they are, and placed
in the middle of a canvas of flat grey (236) or white (255) glass with ``--margin`` pixels on
every side, segmented, and cropped back; pooled object F1 / Dice / Hausdorff and TP / FP / FN
are printed with the glass mask on (the default) and off (``segment(mask_glass=False)``).
Objects on the glass are not counted (cropped away).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from glas_seg.backend.data import dataset_split, load_sample
from glas_seg.backend.inference import segment
from glas_seg.backend.metrics import match_stack, object_scores
from glas_seg.backend.registry import DEFAULT_MODEL, load_model

CANVASES = {"plain": None, "grey 236": 236 / 255, "white 255": 1.0}


def score(model, samples, level: float | None, margin: int, mask_glass: bool) -> dict:
    matches = []
    for sample in samples:
        image = sample.image
        if level is not None:
            image = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), constant_values=level)
        labels = segment(model, image, mask_glass=mask_glass).labels
        if level is not None:
            labels = labels[margin:-margin, margin:-margin]
        matches += match_stack(labels, sample.labels)
    return object_scores(matches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[DEFAULT_MODEL])
    parser.add_argument("--margin", type=int, default=300)
    parser.add_argument("--data", default="../shared/data/glas")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, val_pairs = dataset_split(args.data)
    samples = [load_sample(*p) for p in val_pairs]
    print("| model | glass mask | canvas | object F1 | object Dice | object Hausdorff | TP / FP / FN |")
    print("|---|---|---|---:|---:|---:|---|")
    for name in args.models:
        model = load_model(name, "cpu")
        for mask_glass in (True, False):
            for canvas, level in CANVASES.items():
                start = time.perf_counter()
                s = score(model, samples, level, args.margin, mask_glass)
                print(f"| `{name}` | {'on' if mask_glass else 'off'} | {canvas} | {s['object_f1']:.3f} | "
                      f"{s['object_dice']:.3f} | {s['object_hausdorff']:.1f} | {s['tp']} / {s['fp']} / {s['fn']} |"
                      f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
