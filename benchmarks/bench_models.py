"""Every bundled model: size, speed, training memory and accuracy, for the table in docs/models.md.

Usage::

    python benchmarks/bench_models.py                  # all bundled models, print the table
    python benchmarks/bench_models.py --write-docs     # also rewrite the table in docs/models.md
    python benchmarks/bench_models.py --models unetpp-glands maskrcnn-glands

Per model, in one process with one intra-op thread (process time does not grow when other
jobs share the cores, so these numbers are stable on a busy machine):

* parameters and file size;
* GFLOPs of one eval forward pass on 1x3x512x512 (``torch.utils.flop_counter``: convolutions
  and matrix products, 2 FLOPs per multiply-add; Mask R-CNN at its test-time proposal count);
* CPU seconds per GlaS image: process time of :func:`~glas_seg.backend.inference.segment` on
  ``train_1.bmp`` (775x522) end to end (tiling, network, post-processing), minimum of 3;
* peak training memory: a subprocess runs one training step (forward, loss, backward, AdamW)
  at the batch and crop size the model was trained with, on real crops; its peak RSS;
* validation: the model re-segments the validation images recorded in its file (the
  patient-wise split of its training run) with :func:`~glas_seg.backend.training.evaluate`;
* nuclei models also on TNBC (50 images, never seen in training) as an external test.

Results go to ``docs/model_results.json`` (and, with ``--write-docs``, to ``docs/models.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DOCS = REPO / "docs"
RESULTS = DOCS / "model_results.json"
GPU_RESULTS = DOCS / "model_results_gpu.json"  # written by bench_gpu.py on a machine with a GPU
START, END = "<!-- bench_models:start -->", "<!-- bench_models:end -->"
WHEN = {
    "efficientnet-unet-glands": "The default: ImageNet-pretrained encoder, outlines inside the glands, trained with glass edges, smallest object chosen on the training images; best on all three object scores, fastest pixel model.",
    "unet-glands": "The previous default (from scratch, 3000 iterations); below the new default on all three object scores.",
    "unetpp-glands": "Deep supervision: accurate mode averages the heads, fast mode (one pruned head) for quick previews.",
    "residual-unet-glands": "Most accurate semantic network of the short runs; still improving when stopped: worth a longer run.",
    "kidney-segnet-glands": "Smallest file and FLOPs, but slow on a CPU and weak on glands: for comparison, or retrain on a GPU.",
    "micronet-glands": "Multi-resolution input, auxiliary heads; trained on 192 px crops, not the paper's 508: under-trained here.",
    "maskrcnn-effnet-glands": "Instances from a detector on an ImageNet EfficientNet-Lite0 backbone, no watershed; second-best object F1, better than maskrcnn-glands on all three scores; try it where touching glands merge.",
    "maskrcnn-glands": "Instances from a detector, small ResNet from scratch; superseded by maskrcnn-effnet-glands.",
    "unetpp-nuclei": "Nuclei at 40x (MoNuSeg-style); the better nucleus model, also on TNBC.",
    "kidney-segnet-nuclei": "Nuclei with the smallest model (0.14 M parameters, 0.4 MB), what the paper built it for.",
}


def training_step_memory(model_name: str) -> dict:
    """Run one training step in a fresh process; returns its peak RSS in MiB and step seconds."""
    out = subprocess.run([sys.executable, __file__, "--child", model_name], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(model_name: str) -> None:
    import torch

    from glas_seg.backend.data import PatchDataset, dataset_split, load_sample, rescale_sample
    from glas_seg.backend.models import get_architecture
    from glas_seg.backend.registry import find_model, build_model
    from glas_seg.backend.training import TrainSettings, training_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = find_model(model_name).config
    batch, crop = config.training.get("batch_size", 4), config.training.get("crop_size", 192)
    train_pairs, _ = dataset_split(DATA / ("glas" if config.task == "glands" else "monuseg"))
    sample = rescale_sample(load_sample(*train_pairs[0]), config.scale)
    network = build_model(config).train()
    instances = get_architecture(config.architecture).predicts_instances
    stream = iter(PatchDataset([sample], crop, config.mean, config.std, targets="instances" if instances else "contours",
                               contour_mode=config.targets))
    images, targets = map(torch.stack, zip(*[next(stream) for _ in range(batch)]))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    loss = network(images, targets)["loss"] if instances else training_loss(network(images), targets, TrainSettings())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    seconds = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_mib": peak / 1024, "before_mib": before / 1024, "step_cpu_s": seconds,
                      "batch": batch, "crop": crop}))


def measure(entry) -> dict:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from glas_seg.backend.data import binary_mask_samples, dataset_split, load_sample
    from glas_seg.backend.image_io import read_image
    from glas_seg.backend.inference import segment
    from glas_seg.backend.registry import load_model, validation_score
    from glas_seg.backend.training import evaluate

    model = load_model(entry.path, "cpu")
    config = model.config
    result = {"name": entry.name, "architecture": config.architecture, "task": config.task,
              "params": sum(p.numel() for p in model.network.parameters()),
              "file_mb": entry.path.stat().st_size / 1e6, "training": {k: v for k, v in config.training.items()
                                                                      if k not in ("val_names", "validation")}}
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model.network(torch.randn(1, 3, 512, 512))
    result["gflops_512"] = counter.get_total_flops() / 1e9
    image = read_image(DATA / "glas" / "train" / "train_1.bmp")
    segment(model, image)
    times = []
    for _ in range(3):
        start = time.process_time()
        segment(model, image)
        times.append(time.process_time() - start)
    result["cpu_s_glas_image"] = min(times)
    result["train_step"] = training_step_memory(entry.name)

    root = DATA / ("glas" if config.task == "glands" else "monuseg")
    _, val_pairs = dataset_split(root)
    names = [p[0] for p in val_pairs]
    if names != config.training.get("val_names", names):
        raise RuntimeError(f"{entry.name}: validation split differs from the one recorded at training time")
    result["validation"] = evaluate(model, [load_sample(*p) for p in val_pairs])
    result["validation_images"] = len(names)
    # The number `glas-seg models` and the Segment widget show: the file's own record.
    result["recorded_object_f1_pooled"] = validation_score(config)
    if config.task == "nuclei":
        result["tnbc"] = evaluate(model, binary_mask_samples(DATA / "tnbc"))
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in result.items()}


def _scores(m: dict | None, f1: float | None = None) -> str:
    """``F1 / Dice / Hausdorff``; ``f1`` replaces the measured pooled F1 (the validation column
    shows the model file's recorded number, so that docs, CLI and widget show one number)."""
    if not m:
        return "–"
    f1 = m["object_f1_pooled"] if f1 is None else f1
    return f"{f1:.3f} / {m['object_dice']:.3f} / {m['object_hausdorff']:.1f}"


def table(results: list[dict]) -> str:
    gpu = json.loads(GPU_RESULTS.read_text())["seconds_per_image"] if GPU_RESULTS.exists() else {}
    rows = [
        "| model | architecture | parameters | file | GFLOPs / 512² | CPU s / GlaS image | GPU s | peak training memory "
        "(batch, crop) | training | val. object F1 (pooled) / Dice / Hausdorff | pixel Dice | TNBC (external) F1 / Dice / Hausdorff | when to pick it |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|---:|---|---|",
    ]
    for r in results:
        t, step = r["training"], r["train_step"]
        gpu_s = f"{gpu[r['name']]:.2f}" if r["name"] in gpu else "not measured"
        start = t.get("initialised_from") or {}
        if "iterations" in start:  # continued from an earlier model's weights (train --init): both runs
            done = (f"{start['iterations']} + {t.get('iterations')} it. in {start.get('wall_seconds', 0) / 60:.0f} + "
                    f"{t.get('wall_seconds', 0) / 60:.0f} min")
        else:
            done = f"{t.get('iterations')} it. in {t.get('wall_seconds', 0) / 60:.0f} min"
        training = f"{done}, {t.get('device', '?')}, {t.get('train_images')} train / {r['validation_images']} val images"
        rows.append(
            f"| `{r['name']}` | `{r['architecture']}` | {r['params'] / 1e6:.2f} M | {r['file_mb']:.1f} MB | "
            f"{r['gflops_512']:.1f} | {r['cpu_s_glas_image']:.2f} | {gpu_s} | "
            f"{step['peak_mib']:.0f} MiB ({step['batch']}, {step['crop']}²) | {training} | "
            f"{_scores(r['validation'], r.get('recorded_object_f1_pooled'))} | {r['validation']['pixel_dice']:.3f} | {_scores(r.get('tnbc'))} | "
            f"{WHEN.get(r['name'], '')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="bundled model names (default: all)")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--table-only", action="store_true",
                        help="measure nothing: rebuild the table from docs/model_results*.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    from glas_seg.backend.registry import list_models

    torch.set_num_threads(1)
    entries = [e for e in list_models() if e.source == "bundled" and (not args.models or e.name in args.models)]
    previous = {r["name"]: r for r in json.loads(RESULTS.read_text())["models"]} if RESULTS.exists() else {}
    for entry in [] if args.table_only else entries:
        print(f"measuring {entry.name} ...", file=sys.stderr, flush=True)
        previous[entry.name] = measure(entry)
    order = [e.name for e in list_models() if e.source == "bundled"]
    results = [previous[n] for n in order if n in previous]
    if not args.table_only:
        RESULTS.write_text(json.dumps({"machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
                                       "models": results}, indent=1))
    text = table(results)
    print(text)
    if args.write_docs:
        doc = (DOCS / "models.md").read_text()
        block = f"{START}\n{text}\n{END}"
        doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
        (DOCS / "models.md").write_text(doc)


if __name__ == "__main__":
    main()
