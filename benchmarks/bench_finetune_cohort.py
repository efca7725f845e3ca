"""Does fine-tuning on 3 corrected images help on the rest of a new cohort, without forgetting?

Scenario: a cohort the base model never trained on, the pathologist corrects 3 images, the
model is fine-tuned on them with :func:`glas_seg.backend.finetune.finetune` (the function behind
the widget and ``glas-seg finetune``), and is scored on the *other* images of the cohort
(gain) and on images of the original domain (forgetting).

* ``--task glands``: the validation patients of GlaS ``train/`` (``dataset_split``, seed 0; never
  trained on by the bundled gland models). The malignant images are the new cohort (fine-tune on
  3, score the other malignant ones), the benign ones the original domain (forgetting).
* ``--task nuclei``: TNBC (never used in training): fine-tune on 3 tiles, score the other 47.

Each configuration runs on ``--choices`` different choices of the 3 images (``numpy`` seed
``k`` for choice ``k``, distinct sets); scores are the GlaS object F1 pooled over all objects of
the scored images (:func:`glas_seg.backend.metrics.object_scores`, as ``glas-seg evaluate``
reports), pooled object Dice and mean pixel Dice; the summary gives mean, and min-max spread of
the gain (after - before on the same images) over the choices.

Configurations are ``NAME:key=value,key=value`` with :class:`FinetuneSettings` fields, e.g.
``--config "dec-l2sp:layers=decoder,l2sp=100"``; ``--config default:`` uses the defaults.
Results are appended, one JSON object per fine-tune, to ``--out`` as they come (partial runs keep
what finished).

Usage (one thread, so that other work on the machine is slowed as little as possible)::

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune_cohort.py --task glands --base unet-glands \\
        --config default: --config all:layers=all --out /tmp/cohort.jsonl
    python benchmarks/bench_finetune_cohort.py --summary /tmp/cohort.jsonl
    # time one fine-tune with the defaults (glas-seg's own thread choice) on choice 0's images
    python benchmarks/bench_finetune_cohort.py --task nuclei --base unetpp-nuclei --timing
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def read_grades(grade_csv: Path) -> dict[str, str]:
    """Image name -> GlaS grade (``benign`` / ``malignant``); the CSV's headers may have spaces."""
    with open(grade_csv, newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]
    key = next(k for k in rows[0] if k.lower().startswith("grade") and "glas" in k.lower())
    return {row["name"]: row[key].lower() for row in rows}


def cohorts(task: str, data: Path, grade: str = "malignant") -> tuple[list, list]:
    """(new cohort samples, original-domain samples) for a task; for glands ``grade`` is the cohort."""
    from glas_seg.backend.data import binary_mask_samples, dataset_split, load_sample

    if task == "glands":
        _, val_pairs = dataset_split(data, seed=0)
        grades = read_grades(data / "Grade.csv")
        samples = [load_sample(*pair) for pair in val_pairs]
        return ([s for s in samples if grades[s.name] == grade],
                [s for s in samples if grades[s.name] != grade])
    return binary_mask_samples(data), []


def replay_samples(data: Path, count: int) -> list:
    """``count`` images of the training split (``dataset_split``, seed 0: what the bundled gland
    models trained on), drawn with numpy seed 0: the replay set a fine-tune mixes in."""
    from glas_seg.backend.data import dataset_split, load_sample

    train_pairs, _ = dataset_split(data, seed=0)
    picks = sorted(np.random.default_rng(0).choice(len(train_pairs), min(count, len(train_pairs)), replace=False))
    return [load_sample(*train_pairs[i]) for i in picks]


def choices(n_images: int, n_choices: int, k: int = 3) -> list[list[int]]:
    """``n_choices`` distinct sorted sets of ``k`` indices, set ``i`` drawn with seed ``i`` (and up)."""
    found, seed = [], 0
    while len(found) < n_choices:
        pick = sorted(int(i) for i in np.random.default_rng(seed).choice(n_images, k, replace=False))
        if pick not in found:
            found.append(pick)
        seed += 1
    return found


class Scorer:
    """Per-image object matches of a model, so that any subset can be pooled without re-segmenting."""

    def __init__(self, model_name: str, tile_size: int | None = None) -> None:
        from glas_seg.backend.registry import load_model

        self.model = load_model(model_name, "cpu")
        self.tile_size = tile_size  # None: the model's own
        self.matches: dict[str, list] = {}
        self.dice: dict[str, float] = {}

    def add(self, samples) -> None:
        from glas_seg.backend.inference import segment
        from glas_seg.backend.metrics import match_stack, pixel_dice

        for sample in samples:
            if sample.name not in self.matches:
                labels = segment(self.model, sample.image, tile_size=self.tile_size).labels
                self.matches[sample.name] = match_stack(labels, sample.labels)
                self.dice[sample.name] = pixel_dice(labels, sample.labels)

    def pooled(self, names) -> dict:
        from glas_seg.backend.metrics import object_scores

        scores = object_scores([m for n in names for m in self.matches[n]])
        return {"object_f1": round(scores["object_f1"], 4), "object_dice": round(scores["object_dice"], 4),
                "pixel_dice": round(float(np.mean([self.dice[n] for n in names])), 4)}


def parse_config(text: str) -> tuple[str, dict]:
    from glas_seg.backend.settings import FinetuneSettings

    name, _, body = text.partition(":")
    fields = {f.name: f.type for f in dataclasses.fields(FinetuneSettings)}
    values = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown FinetuneSettings field {key!r} in {text!r}")
        default = getattr(FinetuneSettings(), key)
        if isinstance(default, bool) or "bool" in str(fields[key]):
            values[key] = raw.lower() in ("1", "true", "yes")
        else:  # None defaults (learning_rate: chosen for the layers) are numbers when given
            values[key] = type(default)(raw) if default is not None else float(raw)
    return name, values


def run(args) -> None:
    import torch

    from glas_seg.backend.finetune import FinetuneSettings, finetune

    os.environ["GLAS_SEG_THREADS"] = str(args.threads)  # what glas-seg's own runs set (backend/threads.py)
    torch.set_num_threads(args.threads)
    os.environ["GLAS_SEG_MODEL_DIR"] = tempfile.mkdtemp(prefix="bench-cohort-store-")  # never the user's store
    data = Path(args.data or DATA / ("glas" if args.task == "glands" else "tnbc"))
    cohort, original = cohorts(args.task, data, args.cohort)
    picks = choices(len(cohort), args.choices)
    print(f"{args.task}: cohort {len(cohort)} images, original {len(original)}; choices "
          f"{[[cohort[i].name for i in p] for p in picks]}", file=sys.stderr, flush=True)
    replay = replay_samples(data, args.replay) if args.replay else None
    if replay:
        print(f"replay: {len(replay)} training-split images ({', '.join(s.name for s in replay)})",
              file=sys.stderr, flush=True)
    base = Scorer(args.base, args.tile_size)
    started = time.perf_counter()
    base.add(cohort + original)
    base_seconds = time.perf_counter() - started
    out = Path(args.out)
    for config_text in args.config:
        name, values = parse_config(config_text)
        settings = FinetuneSettings(**{"device": "cpu", **values})
        for k, pick in enumerate(picks):
            if k < args.start_choice:
                continue  # already measured (the choices are deterministic)
            tune = [cohort[i] for i in pick]
            test = [s.name for i, s in enumerate(cohort) if i not in pick]
            load = os.getloadavg()[0]
            started = time.perf_counter()
            result = finetune(args.base, tune, f"bench-{name}-{k}", settings, overwrite=True, replay=replay,
                              description="benchmark: 3 images of an unseen cohort with ground truth")
            seconds = time.perf_counter() - started
            tuned = Scorer(result.entry.name, args.tile_size)
            tuned.add([s for s in cohort + original if s.name in set(test) | {o.name for o in original}])
            task = args.task if args.task == "nuclei" else f"glands-{args.cohort}"
            record = {
                "task": task, "base": args.base, "config": name, "settings": values, "choice": k,
                "finetune_images": [s.name for s in tune], "seconds": round(seconds, 1),
                "iterations_run": result.history[-1]["iteration"] if result.history else 0, "load_average_before": round(load, 2),
                "threads": torch.get_num_threads(), "tile_size": args.tile_size,
                "layers": result.layers, "learning_rate": result.learning_rate,
                "cohort_before": base.pooled(test), "cohort_after": tuned.pooled(test),
                "base_scoring_seconds": round(base_seconds, 1),
                "replay_images": [s.name for s in replay] if replay else [],
            }
            if original:
                names = [s.name for s in original]
                record.update(original_before=base.pooled(names), original_after=tuned.pooled(names))
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{name} choice {k}: cohort F1 {record['cohort_before']['object_f1']:.3f} -> "
                  f"{record['cohort_after']['object_f1']:.3f}"
                  + (f", original {record['original_before']['object_f1']:.3f} -> "
                     f"{record['original_after']['object_f1']:.3f}" if original else "")
                  + f" ({seconds:.0f} s)", file=sys.stderr, flush=True)


def timing(args) -> dict:
    """Wall time of one fine-tune with the given settings on choice 0's 3 images, no scoring.

    Threads are glas-seg's own choice (backend/threads.py) unless ``GLAS_SEG_THREADS`` is set.
    """
    import torch

    from glas_seg.backend.finetune import FinetuneSettings, finetune

    os.environ["GLAS_SEG_MODEL_DIR"] = tempfile.mkdtemp(prefix="bench-cohort-store-")
    data = Path(args.data or DATA / ("glas" if args.task == "glands" else "tnbc"))
    cohort, _ = cohorts(args.task, data, args.cohort)
    tune = [cohort[i] for i in choices(len(cohort), 1)[0]]
    name, values = parse_config(args.config[0] if args.config else "default:")
    load = os.getloadavg()
    started, cpu = time.perf_counter(), time.process_time()
    result = finetune(args.base, tune, "bench-timing", FinetuneSettings(**{"device": "cpu", **values}))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    steps = result.history[-1]["iteration"]
    return {"task": args.task, "base": args.base, "config": name, "images": [s.name for s in tune],
            "layers": result.layers, "iterations": steps, "wall_seconds": round(wall, 1),
            "seconds_per_iteration": round(wall / steps, 3), "threads": torch.get_num_threads(),
            # CPU time of this process, all threads: with one thread, the wall time it would take
            # with a core to itself (the machine is rarely idle while other work runs)
            "cpu_seconds": round(cpu, 1),
            "load_average_before": [round(x, 2) for x in load],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def summary(path: Path) -> str:
    """Markdown table: per (base, config) mean before/after and gain (min..max over choices)."""
    rows: dict[tuple, list] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            rows.setdefault((record["task"], record["base"], record["config"]), []).append(record)
    lines = ["| task | base | config | n | cohort F1 before -> after | gain (min..max) | obj. Dice gain | "
             "pixel Dice gain | original F1 change (min..max) | s per fine-tune |",
             "|---|---|---|---:|---|---|---|---|---|---:|"]
    for (task, base, config), records in rows.items():
        def gains(key, metric="object_f1"):
            return np.array([r[f"{key}_after"][metric] - r[f"{key}_before"][metric] for r in records])

        def mean(key, when):
            return np.mean([r[f"{key}_{when}"]["object_f1"] for r in records])

        g = gains("cohort")
        text = (f"| {task} | {base} | {config} | {len(records)} | {mean('cohort', 'before'):.3f} -> "
                f"{mean('cohort', 'after'):.3f} | {g.mean():+.3f} ({g.min():+.3f}..{g.max():+.3f}) | "
                f"{gains('cohort', 'object_dice').mean():+.3f} | {gains('cohort', 'pixel_dice').mean():+.3f} | ")
        if "original_before" in records[0]:
            o = gains("original")
            text += f"{o.mean():+.3f} ({o.min():+.3f}..{o.max():+.3f}) | "
        else:
            text += "- | "
        text += f"{np.mean([r['seconds'] for r in records]):.0f} |"
        lines.append(text)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["glands", "nuclei"], default="glands")
    parser.add_argument("--base", default="unet-glands", help="base model name (e.g. effunet-glands, unetpp-nuclei)")
    parser.add_argument("--data", default=None, help="GlaS folder (glands) or TNBC folder (nuclei)")
    parser.add_argument("--config", action="append", default=[], help="NAME:field=value,... (repeatable)")
    parser.add_argument("--cohort", choices=["malignant", "benign"], default="malignant",
                        help="glands: which grade is the new cohort (the other is scored for forgetting)")
    parser.add_argument("--choices", type=int, default=3, help="different choices of the 3 images")
    parser.add_argument("--replay", type=int, default=0,
                        help="glands: mix this many training-split images into every fine-tune (finetune(replay=...))")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="inference tile side (default: the model's); 512 runs a TNBC tile whole")
    parser.add_argument("--start-choice", type=int, default=0, help="skip the choices before this one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="cohort.jsonl", help="JSON lines, appended")
    parser.add_argument("--timing", action="store_true",
                        help="only time one fine-tune (first --config, default: the defaults) on choice 0")
    parser.add_argument("--summary", default=None, help="only print the table of a results file")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return 0
    if args.timing:
        print(json.dumps(timing(args)))
        return 0
    if not args.config:
        args.config = ["default:"]
    run(args)
    print(summary(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
