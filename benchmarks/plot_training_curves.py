"""Plot a training run's validation curves (object F1, object Dice, pixel Dice, Hausdorff).

Usage::

    python benchmarks/plot_training_curves.py RUN_FOLDER [RUN_FOLDER ...] --out docs/images/curves.png \
        [--reference efficientnet-unet-glands]

Each run folder is one written by ``glas-seg train`` (its ``state.json`` holds the history).
``--reference`` draws a model's recorded validation (from its file) as a dashed line per panel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("object_f1_pooled", "object F1 (pooled)"), ("object_dice", "object Dice"),
          ("object_hausdorff", "object Hausdorff (px)"), ("pixel_dice", "pixel Dice"))


def history(run: Path) -> list[dict]:
    """Validation records of a run folder, in iteration order."""
    state = json.loads((run / "state.json").read_text())["state"]
    return [h for h in state["history"] if "pixel_dice" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", default=None, help="model name or file whose recorded validation to draw")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2), constrained_layout=True)
    for run in args.runs:
        records = history(run)
        for ax, (key, title) in zip(axes, PANELS):
            points = [(h["iteration"], h[key]) for h in records if key in h and h[key] != float("inf")]
            if points:
                ax.plot(*zip(*points), marker="o", label=run.name)
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
    if args.reference:
        from glas_seg.backend.registry import find_model

        recorded = find_model(args.reference).config.training["validation"]
        for ax, (key, _) in zip(axes, PANELS):
            if recorded.get(key) is not None:  # None: not finite when it was stored
                ax.axhline(recorded[key], color="black", linestyle="--", linewidth=1, label=args.reference)
    axes[0].legend(fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
