"""Parameters, FLOPs and CPU forward time of every registered architecture (default widths).

Usage: python benchmarks/bench_architectures.py [--repeats 5] [--threads 1]

Prints the Markdown rows of the table in ``docs/architectures.md``:

* parameters of the default build;
* GFLOPs of one forward pass on a 1x3x512x512 input, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products, 2 FLOPs
  per multiply-add; element-wise operations, pooling and resampling are not counted);
* CPU seconds of one eval-mode forward pass on 1x3x272x400 -- a GlaS image (775x522) at the
  working scale 0.5 -- as process time (CPU time of all threads, so it does not grow when
  other processes compete for the cores), minimum over ``--repeats``; wall seconds alongside.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from glas_seg.backend.models import ARCHITECTURES, build_architecture

ROWS = [
    ("unet", {}),
    ("unet_plus_plus", {}),
    ("unet_plus_plus", {"mode": "fast", "prune_level": 3}),
    ("unet_plus_plus", {"mode": "fast", "prune_level": 2}),
    ("residual_unet", {}),
    ("kidney_segnet", {}),
    ("micronet", {}),
    ("mask_rcnn", {}),
    ("mask_rcnn", {"backbone": "efficientnet_lite0"}),
    ("efficientnet_unet", {}),
]


def measure(name: str, kwargs: dict, repeats: int) -> dict:
    torch.manual_seed(0)
    network = build_architecture(name, **kwargs).eval()
    params = sum(p.numel() for p in network.parameters())
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            network(torch.randn(1, 3, 512, 512))
        x = torch.randn(1, 3, 272, 400)
        network(x)
        times, walls = [], []
        for _ in range(repeats):
            start, wall = time.process_time(), time.perf_counter()
            network(x)
            times.append(time.process_time() - start)
            walls.append(time.perf_counter() - wall)
    return {"params": params, "gflops": counter.get_total_flops() / 1e9, "cpu_s": min(times), "wall_s": min(walls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = [(n, {}) for n in sorted(ARCHITECTURES) if n not in {r[0] for r in ROWS}]
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s)")
    print("| architecture | builder arguments | parameters | GFLOPs / 512x512 | CPU s / 272x400 | wall s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, kwargs in ROWS + extra:
        r = measure(name, kwargs, args.repeats)
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "defaults"
        print(f"| `{name}` | {shown} | {r['params'] / 1e6:.2f} M | {r['gflops']:.1f} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
