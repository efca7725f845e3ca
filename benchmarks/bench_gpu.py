"""GPU seconds per GlaS image for every bundled model: the "GPU s" column of docs/models.md.

Usage (on a machine with a CUDA GPU)::

    python benchmarks/bench_gpu.py [--image PATH]   # default ../shared/data/glas/train/train_1.bmp

Per model: wall time of :func:`~glas_seg.backend.inference.segment` on one 775x522 GlaS image
end to end (tiling, network on the GPU, post-processing on the CPU as always), after one
warm-up, minimum of 5, with the GPU synchronised before each clock reading. Wall time, not
process time: the GPU works while the process waits. Results go to
``docs/model_results_gpu.json``, which ``bench_models.py --write-docs`` puts in the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "model_results_gpu.json"
IMAGE = REPO.parent / "shared" / "data" / "glas" / "train" / "train_1.bmp"


def seconds_per_image(model, image, repeats: int = 5) -> float:
    import torch

    from glas_seg.backend.inference import segment

    segment(model, image)  # warm-up: cuDNN picks its kernels, memory is allocated
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        segment(model, image)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=IMAGE)
    args = parser.parse_args()
    import torch

    from glas_seg.backend.image_io import read_image
    from glas_seg.backend.registry import list_models, load_model

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    image = read_image(args.image)
    results = {}
    for entry in (e for e in list_models() if e.source == "bundled"):
        results[entry.name] = seconds_per_image(load_model(entry.path, "cuda"), image)
        print(f"{entry.name}: {results[entry.name]:.3f} s", flush=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{torch.cuda.get_device_name()}, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "image": args.image.name, "seconds_per_image": results}, indent=1))


if __name__ == "__main__":
    main()
