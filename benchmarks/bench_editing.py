"""Time the label editing operations on a 775x522 GlaS annotation.

Usage: ``python benchmarks/bench_editing.py [--repeat N] [--markdown]``

Each operation runs on the same plane: GlaS ``train_22_anno`` (775x522, many glands) plus 300
small debris objects; and the same plane with every id mapped to a huge sparse id (int64,
ids near 4e9 and above) to check that nothing is sized by the largest id. "Backend" is the pure
function; "layer" also writes the result into a napari Labels layer as one undo step (diff +
``Labels.data_setitem``), as the widget does. Medians of N runs, as CPU time of this process
(``time.process_time``: what the operation costs, even while other jobs share the CPU) and
wall-clock time (what the user waits on a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from glas_seg.backend import editing
from glas_seg.backend.image_io import read_labels

ROOT = Path(__file__).resolve().parents[1]
ANNOTATION = ROOT.parent / "shared" / "data" / "glas" / "train" / "train_22_anno.bmp"
HUGE = 4_000_000_000


def load_plane() -> np.ndarray:
    labels = read_labels(ANNOTATION).astype(np.int32)
    if labels.shape != (522, 775):
        raise SystemExit(f"expected a 522x775 annotation at {ANNOTATION}, got {labels.shape}")
    rng = np.random.default_rng(0)
    next_id = int(labels.max()) + 1
    for _ in range(300):  # debris: 2x2 .. 4x4 specks on background
        r, c, s = rng.integers(0, 518), rng.integers(0, 771), rng.integers(2, 5)
        if not labels[r:r + s, c:c + s].any():
            labels[r:r + s, c:c + s] = next_id
            next_id += 1
    return labels


def largest_objects(labels: np.ndarray, count: int) -> list[int]:
    ids, sizes = np.unique(labels[labels > 0], return_counts=True)
    return [int(i) for i in ids[np.argsort(-sizes, kind="stable")[:count]]]


def interior_point(mask: np.ndarray) -> list[float]:
    """The pixel deepest inside a mask (where a user would click a seed)."""
    return [float(v) for v in np.unravel_index(np.argmax(ndi.distance_transform_edt(mask)), mask.shape)]


def operations(labels: np.ndarray) -> dict:
    """Operation name -> function of the plane, aimed at the plane's largest glands."""
    first, second = largest_objects(labels, 2)
    rows, cols = np.nonzero(labels == first)
    centre_c = cols.mean()
    line = [[rows.min() - 2, centre_c], [rows.max() + 2, centre_c]]  # across the largest gland
    # Seeds: the two largest glands are first merged (a "fused" object), then split back.
    seeds = [interior_point(labels == first), interior_point(labels == second)]
    fused = editing.merge_labels(labels, [first, second])
    return {
        "delete 1 object": lambda a: editing.delete_labels(a, [first]),
        "merge 2 objects": lambda a: editing.merge_labels(a, [first, second]),
        "split along a line": lambda a: editing.split_along_line(a, line),
        "split by 2 seeds": (lambda a: editing.split_by_seeds(a, seeds), fused),
        "fill holes (all objects)": lambda a: editing.fill_holes(a),
        "fill holes (1 object)": lambda a: editing.fill_holes(a, [first]),
        "remove objects < 50 px": lambda a: editing.remove_small(a, 50),
        "smooth 1 object (r=3)": lambda a: editing.smooth_labels(a, 3, [first]),
        "smooth all objects (r=3)": lambda a: editing.smooth_labels(a, 3),
        "relabel sequentially": editing.relabel_sequentially,
        "next free id": editing.next_free_id,
    }


def timed(func, repeat: int, setup=None) -> tuple[float, float]:
    """Median (CPU ms, wall ms) of ``repeat`` runs after one warm-up; ``setup`` runs untimed."""
    cpu, wall = [], []
    for i in range(repeat + 1):
        args = setup() if setup else ()
        c0, w0 = time.process_time(), time.perf_counter()
        func(*args)
        c1, w1 = time.process_time(), time.perf_counter()
        if i:
            cpu.append(c1 - c0)
            wall.append(w1 - w0)
    return 1000 * statistics.median(cpu), 1000 * statistics.median(wall)


def layer_edit(op, plane: np.ndarray, repeat: int) -> tuple[float, float]:
    """Time op + writing its result into a napari Labels layer as one undo step (the widget's path)."""
    from napari.layers import Labels

    from glas_seg._widget_edit import apply_plane_edit

    def setup():
        return (Labels(plane.copy()),)

    def edit(layer):
        new = op(np.asarray(layer.data))
        if isinstance(new, np.ndarray):  # "next free id" writes nothing
            apply_plane_edit(layer, (), new)

    return timed(edit, repeat, setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    dense = load_plane()
    values = np.unique(dense)
    sparse = (values.astype(np.int64) * 1_000_003 + HUGE)[np.searchsorted(values, dense)]
    sparse[dense == 0] = 0
    n_objects = len(values) - 1
    n_glands = int(np.unique(read_labels(ANNOTATION)).size - 1)
    rows = []
    sparse_ops = operations(sparse)
    for name, op in operations(dense).items():
        op, plane = op if isinstance(op, tuple) else (op, dense)
        sparse_op, sparse_plane = sparse_ops[name] if isinstance(sparse_ops[name], tuple) else (sparse_ops[name], sparse)
        rows.append((
            name,
            timed(lambda: op(plane), args.repeat),
            timed(lambda: sparse_op(sparse_plane), args.repeat),
            layer_edit(op, plane, args.repeat),
        ))
    header = (f"775x522 plane ({n_glands} glands + {n_objects - n_glands} debris objects), "
              f"median of {args.repeat} runs; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.markdown:
        print(header + "\n")
        print("| operation | int32 ids | sparse int64 ids (~4e9) | Labels layer edit (int32) |")
        print("|---|---:|---:|---:|")
        for name, *cells in rows:
            print(f"| {name} | " + " | ".join(f"{c:.1f} ({w:.1f})" for c, w in cells) + " |")
    else:
        print(header)
        print(f"{'operation':28s} {'int32':>15s} {'sparse':>15s} {'layer':>15s}   CPU ms (wall ms)")
        for name, *cells in rows:
            print(f"{name:28s} " + " ".join(f"{c:6.1f} ({w:6.1f})" for c, w in cells))


if __name__ == "__main__":
    main()
