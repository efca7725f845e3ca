"""Seconds per GlaS image (775x522) for the default model, split into forward / tiling / post-processing.

Usage: python benchmarks/bench_segment.py [--image PATH] [--repeats 10] [--write docs/benchmarks.md]

Forward = time inside the network's forward calls; tiling = the rest of
``predict_probabilities`` (normalising, resampling, cutting tiles, blending); post-processing =
watershed, hole filling, size filter and resizing the labels back. All figures come from one run
(medians over repeats), so their ratios are comparable even on a noisy machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from glas_seg.backend.image_io import read_image
from glas_seg.backend.inference import predict_probabilities, segment
from glas_seg.backend.postprocess import instances_from_probabilities, resize_labels
from glas_seg.backend.registry import DEFAULT_MODEL, load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "glas" / "train" / "train_4.bmp"


class ForwardTimer(torch.nn.Module):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.seconds = network, 0.0
        self.size_multiple = getattr(network, "size_multiple", 16)

    def forward(self, x):
        start = time.perf_counter()
        out = self.network(x)
        self.seconds += time.perf_counter() - start
        return out


def measure(image: np.ndarray, repeats: int) -> dict:
    model = load_model(DEFAULT_MODEL, "cpu")
    timer = ForwardTimer(model.network)
    model.network = timer
    segment(model, image)  # warm-up
    rows = []
    for _ in range(repeats):
        timer.seconds = 0.0
        t0 = time.perf_counter()
        probs = predict_probabilities(model, image)
        t1 = time.perf_counter()
        labels = instances_from_probabilities(probs, min_size=round(model.config.min_size * model.config.scale**2))
        resize_labels(labels, image.shape[:2])
        t2 = time.perf_counter()
        rows.append({"forward": timer.seconds, "tiling": (t1 - t0) - timer.seconds, "post": t2 - t1, "total": t2 - t0})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["overhead_ratio"] = (med["tiling"] + med["post"]) / med["forward"]
    med["objects"] = int(labels.max())
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--write", default=None, help="replace the '## Segmentation speed' section of this Markdown file")
    args = parser.parse_args()
    image = read_image(args.image)
    m = measure(image, args.repeats)
    text = (
        "## Segmentation speed\n\n"
        f"`python benchmarks/bench_segment.py --write docs/benchmarks.md` on {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, CPU only; model `{DEFAULT_MODEL}`; image `{Path(args.image).name}` "
        f"({image.shape[1]}x{image.shape[0]}); median of {args.repeats} runs after one warm-up.\n\n"
        "| step | seconds |\n|---|---|\n"
        f"| network forward | {m['forward']:.3f} |\n"
        f"| tiling (normalise, resample, tiles, blending) | {m['tiling']:.3f} |\n"
        f"| post-processing (watershed, holes, size filter, resize) | {m['post']:.3f} |\n"
        f"| **end to end** | **{m['total']:.3f}** |\n\n"
        f"Tiling + post-processing = {100 * m['overhead_ratio']:.0f} % of the forward time "
        f"(target <= 25 %); end-to-end target <= 1.0 s. {m['objects']} objects found.\n"
    )
    print(text)
    if args.write:
        replace_section(Path(args.write), "## Segmentation speed", text)


def replace_section(path: Path, heading: str, text: str) -> None:
    """Replace one ``## `` section of a Markdown file (or append it), keeping the others."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    lines, out, skipping = old.splitlines(keepends=True), [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() == heading
            if skipping:
                continue
        if not skipping:
            out.append(line)
    body = "".join(out).rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(body)


if __name__ == "__main__":
    main()
