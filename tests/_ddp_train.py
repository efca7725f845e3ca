"""Run by torchrun (and in-process) from test_distributed.py: tiny training runs through
``glas_seg.backend.training.train``.

usage: python -m torch.distributed.run --nproc-per-node N tests/_ddp_train.py OUT_DIR ITERATIONS [STOP_AFTER] ...
(several OUT_DIR ITERATIONS STOP_AFTER triples run one after the other in the same process group).
STOP_AFTER 0 runs to the end; otherwise the run is cancelled after that many iterations.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from glas_seg.backend import training
from glas_seg.backend.checkpoint import ModelConfig
from glas_seg.backend.data import Sample
from glas_seg.backend.progress import Cancelled

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bad_input import glands_image  # noqa: E402

# Group norm, unweighted cross-entropy, no Dice: the loss of a batch is the mean of its shards'
# losses and no layer mixes samples, so averaging the processes' gradients is exactly the
# gradient of one process on the whole batch (up to float rounding).
CONFIG = ModelConfig(name="tiny", architecture="unet", arch_kwargs={"width": 4, "depth": 2, "norm": "group"},
                     scale=1.0, tile_size=64, min_size=10)


def samples() -> list[Sample]:
    return [Sample(f"s{k}", glands_image(k, 64)[0].astype("float32") / 255, glands_image(k, 64)[1]) for k in range(3)]


def settings(iterations: int) -> training.TrainSettings:
    return training.TrainSettings(iterations=iterations, eval_every=2, batch_size=4, crop_size=32, learning_rate=1e-2,
                                  warmup=1, boundary_weight=1.0, dice_weight=0.0, augment=False, seed=3,
                                  device="cpu", pretrained=False)


def run(out_dir: str, iterations: int, stop_after: int = 0) -> None:
    steps = []

    def cancel() -> bool:
        steps.append(1)
        return bool(stop_after) and len(steps) > stop_after

    try:
        training.train(CONFIG, settings(iterations), samples(), [], out_dir, cancel=cancel)
    except Cancelled:
        pass


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if os.environ.get("RANK", "0") != "0":
        def refuse(*args, **kwargs):
            raise AssertionError("only rank 0 writes checkpoints")

        training.save_model = refuse  # a rank other than 0 that tried to write would fail the run
        training.atomic_write = refuse
    for k in range(0, len(argv), 3):
        run(argv[k], int(argv[k + 1]), int(argv[k + 2]))
    from glas_seg.backend.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
