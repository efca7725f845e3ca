"""Whole-slide segmentation (issue 13): time, peak memory and accuracy on synthetic slides.

Usage::

    python benchmarks/bench_slide.py [--size 20000x16000 ...] [--tissue 0.07] [--blank 32000x32000]
                                     [--model unet-glands] [--work /tmp/bench_slide]

A slide is built with tifffile, tile by tile (never whole in memory): the patient-wise GlaS
validation images of the model, placed again and again at random offsets on blank glass (242
grey) until they cover ``--tissue`` of it; a tiled pyramidal TIFF (levels 1, 4, 16, 64, 0.62 um/px
in the resolution tags), lossless (zlib) so that the scores compare the pipeline, not JPEG
artefacts (``--jpeg`` writes JPEG tiles as an Aperio scanner does). Each slide is segmented by
``glas-seg segment-slide`` in a child process (one OpenMP thread), which reports its own wall
time and peak resident memory (``VmHWM``), the model load and the exports included. The slide's labels are then cut back at every
placement and scored against the placed ground truth (GlaS object F1, pooled over placements),
next to the same images segmented one by one (plain, and on a 300-pixel glass margin). The time
per slide is compared with the tissue area times the per-pixel time of the images one by one.
A blank slide of ``--blank`` size is segmented last (tissue detection only).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BACKGROUND = 242
MPP = 0.62
TILE = 256
LEVEL_FACTORS = (1, 4, 16, 64)


def placements(shape, images, tissue: float, seed: int = 0) -> list[tuple[int, int, int]]:
    """``(y, x, image index)`` for non-overlapping placements covering about ``tissue`` of ``shape``."""
    rng = np.random.default_rng(seed)
    cell_h = max(im.shape[0] for im in images) + 120
    cell_w = max(im.shape[1] for im in images) + 120
    rows, cols = shape[0] // cell_h, shape[1] // cell_w
    mean_area = np.mean([im.shape[0] * im.shape[1] for im in images])
    n = min(rows * cols, max(1, round(tissue * shape[0] * shape[1] / mean_area)))
    cells = np.sort(rng.choice(rows * cols, size=n, replace=False))
    out = []
    for k, cell in enumerate(cells):
        index = k % len(images)
        h, w = images[index].shape[:2]
        r, c = divmod(int(cell), cols)
        y = r * cell_h + int(rng.integers(0, cell_h - h + 1))
        x = c * cell_w + int(rng.integers(0, cell_w - w + 1))
        out.append((y, x, index))
    return out


def write_slide(path: Path, shape, images, places, jpeg: bool = False) -> None:
    """A tiled pyramidal TIFF (zlib, or JPEG quality 90 as scanners write), written tile by tile."""
    import tifffile
    from skimage.transform import downscale_local_mean

    def level_images(factor):
        if factor == 1:
            return images
        return [np.round(downscale_local_mean(im, (factor, factor, 1), cval=BACKGROUND)).astype(np.uint8)
                for im in images]

    def tiles(factor):
        small = level_images(factor)
        boxes = np.array([(y // factor, x // factor, y // factor + small[i].shape[0], x // factor + small[i].shape[1])
                          for y, x, i in places]).reshape(-1, 4)
        h, w = -(-shape[0] // factor), -(-shape[1] // factor)
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                tile = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)
                hit = np.nonzero((boxes[:, 0] < ty + TILE) & (boxes[:, 2] > ty) & (boxes[:, 1] < tx + TILE)
                                 & (boxes[:, 3] > tx))[0]
                for k in hit:
                    y0, x0, y1, x1 = boxes[k]
                    image = small[places[k][2]]
                    sy0, sx0 = max(ty, y0), max(tx, x0)
                    sy1, sx1 = min(ty + TILE, y1, h), min(tx + TILE, x1, w)
                    tile[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx] = image[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
                yield tile

    compression = {"compression": "jpeg", "compressionargs": {"level": 90}} if jpeg else {"compression": "zlib"}
    factors = [f for f in LEVEL_FACTORS if f == 1 or max(shape) // f >= 512]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, factor in enumerate(factors):
            level_shape = (-(-shape[0] // factor), -(-shape[1] // factor), 3)
            options = dict(subifds=len(factors) - 1, resolution=(1e4 / MPP, 1e4 / MPP),
                           resolutionunit="CENTIMETER") if k == 0 else dict(subfiletype=1)
            tif.write(tiles(factor), shape=level_shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      **compression, **options)


def run_cli(slide: Path, out: Path, model: str, chunk_size: int = 2048) -> dict:
    """``glas-seg segment-slide`` in a child process: wall time and its own peak RSS."""
    # VmHWM (the peak of this process's own memory map), not ru_maxrss: Linux carries ru_maxrss
    # over exec, so a child would report the benchmark's own peak.
    code = ("import re, sys, time; from glas_seg.cli import main; t = time.perf_counter(); "
            "rc = main(sys.argv[1:]); "
            "kb = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('BENCH', time.perf_counter() - t, kb, file=sys.stderr); sys.exit(rc)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, "segment-slide", str(slide), "--out", str(out), "--model",
                           model, "--device", "cpu", "--restart", "--chunk-size", str(chunk_size)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("BENCH"))
    _, seconds, kb = line.split()
    summary = next(ln for ln in done.stderr.splitlines() if " chunks (tissue)" in ln)
    segmenting = float(re.search(r"\(tissue\), (\d+) s", summary).group(1))
    return {"seconds": float(seconds), "segment_seconds": segmenting, "peak_gb": int(kb) / 1024**2,
            "summary": summary.strip()}


def score_slide(store: Path, samples, places) -> dict:
    from glas_seg.backend.metrics import match_stack, object_scores
    from glas_seg.backend.slide_segment import open_labels

    labels = open_labels(store)[0]
    matches = []
    for y, x, index in places:
        truth = samples[index].labels
        matches += match_stack(np.asarray(labels[y : y + truth.shape[0], x : x + truth.shape[1]]).astype(np.int32),
                               truth)
    return object_scores(matches)


def one_by_one(model, samples, places) -> dict:
    from glas_seg.backend.inference import segment
    from glas_seg.backend.metrics import match_stack, object_scores

    results, seconds, margin = {}, 0.0, 300
    plain, glass = [], []
    for sample in samples:
        start = time.perf_counter()
        plain.append(segment(model, sample.image).labels)
        seconds += time.perf_counter() - start
        padded = np.pad(sample.image, ((margin, margin), (margin, margin), (0, 0)), constant_values=BACKGROUND)
        glass.append(segment(model, padded).labels[margin:-margin, margin:-margin])
    for name, labels in (("alone", plain), ("alone on glass", glass)):
        matches = []
        for _, _, index in places:
            matches += match_stack(labels[index], samples[index].labels)
        results[name] = object_scores(matches)
    pixels = sum(s.image.shape[0] * s.image.shape[1] for s in samples)
    results["seconds_per_mp"] = seconds / (pixels / 1e6)
    return results


def parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", default=["20000x16000"], help="slide sizes, WIDTHxHEIGHT")
    parser.add_argument("--tissue", type=float, default=0.07)
    parser.add_argument("--blank", default="32000x32000", help="blank slide size (empty: none)")
    parser.add_argument("--jpeg", action="store_true", help="JPEG tiles (quality 90) instead of lossless zlib")
    parser.add_argument("--model", default="unet-glands")
    parser.add_argument("--chunk-size", type=int, default=2048, help="segment-slide --chunk-size")
    parser.add_argument("--data", default="../shared/data/glas")
    parser.add_argument("--work", default="/tmp/bench_slide")
    args = parser.parse_args()

    import torch

    from glas_seg.backend.data import load_sample
    from glas_seg.backend.registry import load_model

    torch.set_num_threads(1)
    model = load_model(args.model, "cpu")
    names = model.config.training.get("val_names")
    names = ast.literal_eval(names) if isinstance(names, str) else names
    root = Path(args.data) / "train"
    samples = [load_sample(n, root / f"{n}.bmp", root / f"{n}_anno.bmp") for n in names]
    images = [s.image for s in samples]
    if images[0].dtype != np.uint8:  # float RGB in [0, 1]: back to the 8 bits a scanner writes
        images = [np.round(np.clip(im, 0, 1) * 255).astype(np.uint8) for im in images]
        for sample, image in zip(samples, images):
            sample.image = image
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.size:
        shape = parse_size(size)
        places = placements(shape, images, args.tissue)
        tissue_mp = sum(images[i].shape[0] * images[i].shape[1] for _, _, i in places) / 1e6
        slide = work / f"slide_{size}{'_jpeg' * args.jpeg}.tif"
        start = time.perf_counter()
        if not slide.is_file():  # the same size and seed give the same slide: reuse it
            write_slide(slide, shape, images, places, jpeg=args.jpeg)
        build = time.perf_counter() - start
        print(f"{size}: {len(places)} placements, {tissue_mp:.1f} MP tissue "
              f"({tissue_mp / (shape[0] * shape[1] / 1e6):.1%}), built in {build:.0f} s, "
              f"{slide.stat().st_size / 1e6:.0f} MB", flush=True)
        run = run_cli(slide, work / f"out_{size}", args.model, args.chunk_size)
        print(f"  {run['summary']}\n  wall {run['seconds']:.1f} s, peak RSS {run['peak_gb']:.2f} GB", flush=True)
        slide_scores = score_slide(work / f"out_{size}" / f"{slide.stem}_labels.zarr", samples, places)
        alone = one_by_one(model, samples, places)
        expected = tissue_mp * alone["seconds_per_mp"]
        print(f"  object F1: slide {slide_scores['object_f1']:.3f}, alone {alone['alone']['object_f1']:.3f}, "
              f"alone on glass {alone['alone on glass']['object_f1']:.3f}; "
              f"segmenting time / (tissue x per-image time) = {run['segment_seconds']:.0f} / {expected:.0f} s = "
              f"{run['segment_seconds'] / expected:.2f}", flush=True)
        rows.append((size, shape[0] * shape[1] / 1e6, tissue_mp, run, slide_scores, alone, expected))
    if args.blank:
        shape = parse_size(args.blank)
        slide = work / f"blank_{args.blank}.tif"
        if not slide.is_file():
            write_slide(slide, shape, images, [])
        run = run_cli(slide, work / f"out_blank_{args.blank}", args.model, args.chunk_size)
        print(f"blank {args.blank}: wall {run['seconds']:.1f} s, peak RSS {run['peak_gb']:.2f} GB", flush=True)
    print("\n| slide (px) | MP | tissue MP | command wall | of which segmenting | peak RSS | object F1 slide | "
          "alone | alone on glass | segmenting / (tissue x per-image time) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, mp, tissue_mp, run, s, alone, expected in rows:
        print(f"| {size} | {mp:.0f} | {tissue_mp:.1f} | {run['seconds']:.0f} s | {run['segment_seconds']:.0f} s | "
              f"{run['peak_gb']:.2f} GB | {s['object_f1']:.3f} | {alone['alone']['object_f1']:.3f} | "
              f"{alone['alone on glass']['object_f1']:.3f} | {run['segment_seconds'] / expected:.2f} |")


if __name__ == "__main__":
    main()
