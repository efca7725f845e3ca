"""Command line: ``glas-seg segment``, ``glas-seg train`` (more subcommands register themselves)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  glas-seg segment slide1.png slide2.tif --out results/
  glas-seg train --data ../shared/data/glas --out runs/unet --iterations 4000
"""


def _progress_bar(total: int, desc: str, unit: str, disable: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=disable)


def _main_process() -> bool:
    """False in the processes of a torchrun run other than rank 0 (they neither report nor export)."""
    import os

    from .backend.distributed import launched_by_torchrun

    return not launched_by_torchrun() or os.environ["RANK"] == "0"


def _training_reporter(bar):
    """Progress callback for training events: loss on the bar, one line per validation."""

    description = bar.desc

    def progress(event: dict) -> None:
        if "phase" in event:  # fine-tuning's work around training, one step per image
            bar.set_description(f"{event['phase']} ({event['done']}/{event['total']} images)", refresh=True)
            return
        if "object_f1" in event:
            bar.write(f"iteration {event['iteration']}: validation object F1 {event['object_f1']:.3f}, "
                      f"pixel Dice {event['pixel_dice']:.3f}", file=sys.stderr)
        if "loss" in event:
            if bar.desc != description:
                bar.set_description(description, refresh=False)
            bar.n = event["iteration"]
            bar.set_postfix(loss=f"{event['loss']:.3f}", refresh=False)
            bar.update(0)

    return progress


def cmd_segment(args: argparse.Namespace) -> int:
    from .backend.batch import SegmentOptions, dask_client, remember_model, run_batch
    from .backend.errors import GlasSegError
    from .backend.inference import predicts_instances
    from .backend.outputs import output_folder
    from .backend.registry import find_model, load_model, pick_device
    from .backend.validate import check_segment_options

    # Everything that can be checked is checked before the model is loaded and any image read.
    check_segment_options(args.tile_size, args.overlap, min_size=args.min_size)
    if args.cluster is not None and args.workers is not None:
        raise GlasSegError("give --cluster (a running dask scheduler) or --workers (a local cluster), not both")
    if args.workers is not None and args.workers < 1:
        raise GlasSegError(f"--workers must be at least 1, not {args.workers}")
    if args.split_slides and args.cluster is None and args.workers is None:
        raise GlasSegError("--split-slides splits each slide across dask workers: give --workers N or --cluster too")
    if args.cluster is None:
        pick_device(args.device)  # on a cluster the device is the workers' business
    targets = _label_targets(args.images)
    out = output_folder(args.out, "--out")
    entry = find_model(args.model)
    # Loaded here in every case: a damaged model or a bad --mode / --tta is one line before any
    # work, not one failure per image on the workers.
    model = load_model(entry.path, "cpu" if args.cluster else args.device, mode=args.mode)
    if args.tta and predicts_instances(model):
        raise ValueError(f"--tta does not apply to {model.config.architecture} models (they detect instances directly)")
    options = SegmentOptions(model_path=str(entry.path.resolve()), model_name=entry.name, device=args.device,
                             mode=args.mode, tile_size=args.tile_size, overlap=args.overlap, tta=args.tta,
                             min_size=args.min_size, mask_glass=not args.keep_glass)
    if args.cluster is None and args.workers is None:
        remember_model(options, model)  # the in-process run reuses it
    with _progress_bar(len(targets), "segment", "image") as bar:

        def on_plan(todo: int, done: int) -> None:
            bar.update(done)
            if done:
                bar.write(f"{done} image(s) already done (manifest in {out}), skipped", file=sys.stderr)

        def on_result(image: str, record: dict) -> None:
            if record["state"] == "done":
                if record.get("replaced"):
                    bar.write(f"replaced existing {record['outputs'][0]}", file=sys.stderr)
                bar.set_postfix_str(f"{Path(image).name}: {record['objects']} objects")
            else:  # one bad image or output: go on with the rest
                bar.write(f"skipped {image}: {record['message']}", file=sys.stderr)
            bar.update()

        jobs = [(path, name) for path, name in targets]
        if args.cluster is None and args.workers is None:
            summary = run_batch(jobs, out, options, on_plan=on_plan, on_result=on_result)
        else:
            with dask_client(args.cluster, args.workers) as client:
                executor = args.cluster or f"LocalCluster({args.workers})"
                summary = run_batch(jobs, out, options, client=client, executor=executor,
                                    split_slides=args.split_slides, on_plan=on_plan, on_result=on_result)
    if summary.settings_changed:
        print("the settings differ from the previous run's in this folder: every image was segmented again",
              file=sys.stderr)
    for image, message in summary.failed:  # reported together at the end, where they are seen
        print(f"failed: {image}: {message}", file=sys.stderr)
    # One line per run, so that the user knows where to look (the bar only shows progress).
    print(f"wrote {len(summary.done)} label map(s) (<image stem>_labels.tif) to {out.resolve()}"
          + (f"; {len(summary.skipped)} already done" if summary.skipped else "")
          + (f"; {len(summary.failed)} image(s) skipped" if summary.failed else "")
          + f"; manifest {summary.manifest.name}", file=sys.stderr)
    return 1 if summary.failed else 0


def _label_targets(images: list[str]) -> list[tuple[Path, str]]:
    """``(image, output file name)`` per input; two inputs that would write the same file are refused.

    Names are compared case-insensitively: on macOS and Windows ``A.png`` and ``a.png`` would
    overwrite each other's labels. The same file given twice is segmented once.
    """
    from .backend.errors import GlasSegError

    seen: dict[str, Path] = {}
    targets = []
    for path in map(Path, images):
        # x.ome.tif -> x_labels.tif, as segment-slide names it (.ome.tif is one suffix)
        stem = path.name[: -len(".ome.tiff")] if path.name.lower().endswith(".ome.tiff") else (
            path.name[: -len(".ome.tif")] if path.name.lower().endswith(".ome.tif") else path.stem)
        name = f"{stem}_labels.tif"
        other = seen.get(name.casefold())
        if other is not None:
            if other.resolve() == path.resolve():
                continue
            raise GlasSegError(f"{other} and {path} would both be written to {name}; "
                               "segment them into different --out folders or rename one")
        seen[name.casefold()] = path
        targets.append((path, name))
    return targets


def cmd_train(args: argparse.Namespace) -> int:
    from .backend.checkpoint import ModelConfig, save_model
    from .backend.data import dataset_split, load_sample
    from .backend.models import get_architecture
    from .backend.distributed import shutdown
    from .backend.run_start import check_resume, initial_weights, resumable
    from .backend.training import TrainSettings, check_loader_workers, check_min_size_choice, train
    from .backend.checkpoint import config_replace
    from .backend.model_schema import check_config, expected_weights
    from .backend.outputs import output_file, output_folder
    from .backend.registry import pick_device

    architecture = get_architecture(args.model)
    # Every option is checked before the data is read: a bad value fails in a second, not after loading.
    settings = TrainSettings(iterations=args.iterations, eval_every=args.eval_every, batch_size=args.batch_size,
                             crop_size=args.crop_size, learning_rate=args.lr, optimizer=args.optimizer,
                             seed=args.seed, device=args.device, glass=args.glass, glass_fill=args.glass_fill,
                             choose_min_size=args.choose_min_size, gap_weight=args.gap_weight,
                             gap_radius=args.gap_radius, pretrained=not args.no_pretrained,
                             loader_workers=args.loader_workers, encoder_lr_factor=args.encoder_lr_factor,
                             augment_strength=args.augment_strength)
    pick_device(args.device)
    config = ModelConfig(
        name=args.name, architecture=args.model, arch_kwargs=_json_object(args.arch_kwargs, "--arch-kwargs"),
        task=args.task, scale=args.scale, min_size=args.min_size, tile_size=args.tile_size, targets=args.targets,
        mean=architecture.input_mean or ModelConfig.mean, std=architecture.input_std or ModelConfig.std,
    )
    check_config(config, "train options")
    expected_weights(config)  # the builder accepts --arch-kwargs (names and values)
    check_min_size_choice(config, settings)
    check_loader_workers(settings)
    check_resume(args.out, settings)
    init_state, init_record = None, None
    if args.init and resumable(args.out):
        print(f"--init {args.init} left aside: {args.out} holds a run, which is resumed", file=sys.stderr)
    elif args.init:
        init_state, config, init_record = initial_weights(args.init, config)
    output_folder(args.out, "--out")
    if args.export:
        output_file(args.export, "--export")
    train_pairs, val_pairs = dataset_split(args.data, args.val_fraction, args.seed)
    print(f"{len(train_pairs)} training and {len(val_pairs)} validation images (patient-wise split)", file=sys.stderr)
    train_samples = [load_sample(*p) for p in train_pairs]
    val_samples = [load_sample(*p) for p in val_pairs]
    config = config_replace(config, training={
        "data": str(args.data), "split": f"patient-wise, val_fraction={args.val_fraction}, seed={args.seed}",
        "val_names": [p[0] for p in val_pairs], **({"initialised_from": init_record} if init_record else {})})
    main_process = _main_process()
    bar = _progress_bar(args.iterations, "train", "it", disable=not main_process)
    progress = _training_reporter(bar) if main_process else None
    try:
        _, state = train(config, settings, train_samples, val_samples, args.out, init_state=init_state,
                         progress=progress)
    finally:
        bar.close()  # before any error message, which would otherwise share the bar's line
        shutdown()  # leave the process group of a torchrun run (nothing otherwise)
    if not main_process:
        return 0
    best = Path(args.out) / "best.safetensors"
    if args.choose_min_size:
        from .backend.checkpoint import load_state

        choice = load_state(best)[1].training.get("min_size_choice")
        if choice:
            print(f"best model: smallest object {choice['min_size']} px, chosen on the {choice['chosen_on']} "
                  f"(object F1 + Dice {choice['before']['score']:.3f} at {choice['before']['min_size']} px, "
                  f"{choice['after']['score']:.3f} chosen)", file=sys.stderr)
    if args.export:
        from .backend.checkpoint import load_state
        from .backend.registry import build_network

        weights, best_config = load_state(best)
        save_model(args.export, build_network(best_config, weights, best.name), best_config, half=True)
        print(f"exported best model to {args.export}", file=sys.stderr)
    print(f"best validation object F1 {state.best_object_f1:.3f}; run folder {args.out}", file=sys.stderr)
    return 0


def _json_object(text: str, option: str) -> dict:
    """Parse an option holding a JSON object (``'{"width": 16}'``); empty means ``{}``."""
    from .backend.errors import GlasSegError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GlasSegError(f"{option} is not valid JSON ({exc}); write e.g. '{{\"width\": 16}}'") from None
    if not isinstance(value, dict):
        raise GlasSegError(f"{option} must be a JSON object of builder arguments such as '{{\"width\": 16}}', "
                           f"not a {type(value).__name__}")
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .backend.image_io import read_labels
    from .backend.metrics_report import format_table, pair_label_files, score_set, write_csv, write_json
    from .backend.outputs import output_file

    for option, path in (("--csv", args.csv), ("--json", args.json)):
        if path:
            output_file(path, option)  # before scoring: a folder given as --csv must not cost the whole run
    pairs, pred_only, gt_only = pair_label_files(args.pred_dir, args.gt_dir)
    if not pairs:
        raise ValueError(f"No prediction in {args.pred_dir} has a ground truth of the same name in {args.gt_dir} "
                         "(expected X_labels.tif or X.tif/.png against X_anno.bmp or X.tif/.png)")
    for side, names in (("prediction", pred_only), ("ground truth", gt_only)):
        if names:
            print(f"{len(names)} {side} file(s) without a partner, skipped: {', '.join(names[:5])}"
                  + (" ..." if len(names) > 5 else ""), file=sys.stderr)

    def items():
        for name, pred_path, gt_path in pairs:
            pred, gt = read_labels(pred_path), read_labels(gt_path)
            if pred.shape != gt.shape:
                raise ValueError(f"{name}: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
            yield name, pred, gt

    with _progress_bar(len(pairs), "evaluate", "image") as bar:
        report = score_set(items(), progress=lambda done, total: bar.update(), total=len(pairs))
    print(format_table(report))
    if args.csv:
        write_csv(report, args.csv)
    if args.json:
        write_json(report, args.json)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .backend.finetune import (FinetuneSettings, finetune, format_before_after, format_thresholds,
                                   samples_from_folders)

    samples = samples_from_folders(args.images_dir, args.labels_dir)
    print(f"{len(samples)} image/label pair(s): {', '.join(s.name for s in samples[:8])}"
          f"{'...' if len(samples) > 8 else ''}", file=sys.stderr)
    settings = FinetuneSettings(iterations=args.iterations, learning_rate=args.lr, batch_size=args.batch_size,
                                crop_size=args.crop_size, augment=not args.no_augment,
                                val_fraction=args.val_fraction, eval_every=args.eval_every, seed=args.seed,
                                device=args.device, freeze_norm=not args.update_norm_stats, layers=args.layers,
                                l2sp=args.l2sp, augment_strength=args.augment_strength, patience=args.patience,
                                calibrate=args.calibrate, replay_share=args.replay_share, optimizer=args.optimizer)
    replay = samples_from_folders(args.replay) if args.replay else None
    if replay:
        print(f"{len(replay)} replay pair(s) from {args.replay}", file=sys.stderr)
    bar = _progress_bar(args.iterations, "fine-tune", "it")
    progress = _training_reporter(bar)

    description = f"folders {args.images_dir}" + (f" + {args.labels_dir}" if args.labels_dir else "")
    try:
        result = finetune(args.base, samples, args.name, settings, description=description,
                          overwrite=args.overwrite, progress=progress, replay=replay)
    finally:
        bar.close()
    print(f"trained layers: {result.layers}, learning rate {result.learning_rate:g}", file=sys.stderr)
    print(f"saved user model {result.entry.name!r} to {result.entry.path} ({result.wall_seconds:.0f} s); "
          f"use it with: glas-seg segment --model {result.entry.name} ...", file=sys.stderr)
    for report in (format_thresholds(result), format_before_after(result)):
        if report:
            print(report, file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .backend import model_store
    from .backend.registry import format_validation_score, list_models, user_model_dir

    action = getattr(args, "action", None) or "list"
    if action == "list":
        models = list_models()
        entries = [model_store.describe(entry) for entry in models]
        damaged = model_store.damaged_models()  # shown, not hidden, so that they can be deleted
        if args.json or getattr(args, "list_json", False):
            print(json.dumps(entries + damaged, indent=1))
        elif not entries and not damaged:
            print(f"no models (user models are kept in {user_model_dir()})")
        else:
            width = max(len(e["name"]) for e in entries + damaged)
            for e, entry in zip(entries, models):
                base = f", from {e['base_model']}" if e["base_model"] else ""
                score = format_validation_score(entry.config)  # the number docs/models.md lists
                print(f"{e['name']:<{width}}  {e['source']:<7}  {e['task']:<6}  {e['architecture']}{base}"
                      f"{', ' + score if score else ''}")
            for e in damaged:
                print(f"{e['name']:<{width}}  {e['source']:<7}  damaged: {e['damaged']} "
                      f"(remove it with: glas-seg models delete {e['name']})")
    elif action == "export":
        print(f"exported to {model_store.export_model(args.name, args.destination, overwrite=args.overwrite)}")
    elif action == "import":
        entry = model_store.import_model(args.file, name=args.name, overwrite=args.overwrite)
        print(f"imported {args.file} as user model {entry.name!r}")
    elif action == "delete":
        print(f"deleted {model_store.delete_model(args.name)}")
    elif action == "rename":
        print(f"renamed {args.old!r} to {model_store.rename_model(args.old, args.new).name!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .backend.export import export_model, sidecar_path

    path = export_model(args.model, args.out, format=args.format, mode=args.mode)
    where = "rdf.yaml and README.md inside" if args.format == "bioimageio" else f"configuration in {sidecar_path(path)}"
    print(f"exported {args.model} ({args.format}) to {path}; {where}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Defaults come from the backend (no torch import): one place each, shared with the API.
    from .backend.registry import DEFAULT_MODEL
    from .backend.settings import DEFAULT_OVERLAP, FINETUNE_LAYER_CHOICES, FinetuneSettings

    ft_defaults = FinetuneSettings()
    parser = argparse.ArgumentParser(
        prog="glas-seg", description="Gland and nucleus instance segmentation for H&E images.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment images into instance label TIFFs",
                         description="Write <image stem>_labels.tif (uint32/int32 instance ids, same height and width) per image. "
                                     "A manifest in --out (glas_seg_batch.json) records each image's state, outputs "
                                     "and timings: the same command again skips the images done. --workers / "
                                     "--cluster spread the images over dask worker processes (docs/cluster.md).")
    seg.add_argument("images", nargs="+",
                     help="PNG, BMP, JPEG or TIFF images, or whole-slide images (SVS, NDPI, MRXS, pyramidal TIFF...): "
                          "each slide is segmented chunk by chunk and gets the files of segment-slide")
    seg.add_argument("--out", required=True,
                     help="output folder (created if missing); an existing <stem>_labels.tif there is replaced "
                          "and each replacement is reported; two inputs with the same stem are refused")
    seg.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"model name (see `glas-seg models`) or .safetensors path (default: {DEFAULT_MODEL})")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    seg.add_argument("--tile-size", type=int, default=None, help="tile side in network pixels")
    seg.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, help="tile overlap fraction (default: %(default)s)")
    seg.add_argument("--min-size", type=int, default=None, help="smallest object kept, in image pixels")
    seg.add_argument("--tta", action="store_true", help="average over flips (slower, slightly better)")
    seg.add_argument("--keep-glass", action="store_true",
                     help="do not treat blank glass at the image border as background (it is by default)")
    seg.add_argument("--mode", default=None, choices=["accurate", "fast"],
                     help="inference mode of models that have several (U-Net++: average the heads or one pruned head)")
    seg.add_argument("--cluster", default=None, metavar="ADDRESS",
                     help="send the images to a running dask scheduler (tcp://host:8786); the model file and the "
                          "images must be readable by its workers at the same paths (docs/cluster.md)")
    seg.add_argument("--workers", type=int, default=None, metavar="N",
                     help="start a local dask cluster of N worker processes (one thread each) for this run")
    seg.add_argument("--split-slides", action="store_true",
                     help="with --workers / --cluster: split each slide across all the workers (window by window; "
                          "this process writes its label store) instead of giving each slide to one worker; for "
                          "cohorts with fewer slides than workers. Same outputs either way (docs/cluster.md)")
    seg.set_defaults(func=cmd_segment)
    # Whole-slide images (segment-slide): options and code in cli_slide.py.
    from .cli_slide import add_parser as add_slide_parser

    add_slide_parser(sub, DEFAULT_MODEL, DEFAULT_OVERLAP)

    tr = sub.add_parser("train", help="train a model on a GlaS-style or image/label folder",
                        description="Train on DATA/train (X.bmp + X_anno.bmp) with a patient-wise validation split from "
                                    "DATA/Grade.csv, or on a folder of X.png + X_label.tif pairs (e.g. MoNuSeg) split by "
                                    "patient (TCGA barcode) or by image.")
    tr.add_argument("--data", required=True, help="GlaS folder (train/ + Grade.csv) or folder of image/label pairs")
    tr.add_argument("--out", required=True, help="run folder (resumed if it exists)")
    tr.add_argument("--model", default="unet", help="architecture name")
    tr.add_argument("--arch-kwargs", default="", help='builder arguments as JSON, e.g. \'{"width": 16}\'')
    tr.add_argument("--name", default="unet-glands", help="model name stored in the weights")
    tr.add_argument("--task", default="glands", choices=["glands", "nuclei"])
    tr.add_argument("--scale", type=float, default=0.5, help="working scale relative to the images")
    tr.add_argument("--iterations", type=int, default=4000)
    tr.add_argument("--eval-every", type=int, default=250)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--crop-size", type=int, default=192)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--optimizer", default="adamw", choices=["adamw", "amsgrad", "sgd"],
                    help="AdamW (default), AdamW with AMSGrad, or SGD with momentum 0.9")
    tr.add_argument("--min-size", type=int, default=400, help="default smallest object for this model, image pixels")
    tr.add_argument("--choose-min-size", action="store_true",
                    help="at every validation, first choose the smallest object kept (--min-size x 1 to 7.5) on "
                         "the training images, then validate with it (needs validation images)")
    tr.add_argument("--tile-size", type=int, default=384, help="default inference tile side for this model, network pixels")
    tr.add_argument("--targets", default="outer", choices=["outer", "inner"],
                    help="boundary class outside every object (older models) or inside it (foreground = objects)")
    tr.add_argument("--glass", type=float, default=0.0,
                    help="share of training crops given a tissue edge next to blank glass (0-1)")
    tr.add_argument("--glass-fill", type=float, default=0.0,
                    help="share of those crops whose glass is filled with mirrored tissue, as segmentation "
                         "shows glass to the network (0-1; the filled pixels are not scored)")
    tr.add_argument("--gap-weight", type=float, default=0.0,
                    help="extra loss weight on background in narrow gaps between objects, where close glands "
                         "fuse (0 = off; e.g. 5)")
    tr.add_argument("--gap-radius", type=int, default=4,
                    help="gaps up to twice this many working-scale pixels wide get --gap-weight")
    tr.add_argument("--augment-strength", type=float, default=1.0,
                    help="scale of the random rotations, scaling, elastic, colour and stain jitter, 0-2 "
                         "(default: %(default)s, as the bundled models were trained)")
    tr.add_argument("--encoder-lr-factor", type=float, default=1.0,
                    help="learning rate of the (pretrained) encoder relative to --lr, e.g. 0.1")
    tr.add_argument("--loader-workers", type=int, default=None,
                    help="data-loading processes (default: none on the CPU; on a GPU one per free physical "
                         "core, at most 8)")
    tr.add_argument("--init", default=None, metavar="MODEL",
                    help="start from the weights of this trained model (a name from glas-seg models, or a "
                         ".safetensors file) and its input normalisation, instead of ImageNet's weights: same "
                         "--model and --arch-kwargs; left aside when --out holds a run to resume")
    tr.add_argument("--no-pretrained", action="store_true",
                    help="start from random weights even where the architecture has ImageNet weights")
    tr.add_argument("--val-fraction", type=float, default=0.2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--export", default=None, help="also write the best model (fp16) to this .safetensors path")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="score predicted label maps against ground truth (GlaS metrics)",
                        description="Pair PRED_DIR/X_labels.tif (or X.tif/.png) with GT_DIR/X_anno.bmp (or X.tif/.png); "
                                    "print object F1, object Dice and object Hausdorff per image and pooled as in "
                                    "the GlaS challenge. See docs/metrics.md.")
    ev.add_argument("pred_dir", help="folder of predicted instance label maps")
    ev.add_argument("gt_dir", help="folder of ground-truth instance label maps")
    ev.add_argument("--csv", default=None, help="write every metric per image, pooled and mean to this CSV file")
    ev.add_argument("--json", default=None, help='write {"pooled", "mean_per_image", "images"} to this JSON file')
    ev.set_defaults(func=cmd_evaluate)
    ft = sub.add_parser("finetune", help="fine-tune a model on corrected labels; adds a user model",
                        description="Fine-tune the --base model on images and corrected label maps paired by file "
                                    "name (IMAGES_DIR/X.png + LABELS_DIR/X.tif, or GlaS-style X.bmp + X_anno.bmp in "
                                    "one folder) and save the result as the user model --name (see `glas-seg models`).")
    ft.add_argument("images_dir", metavar="IMAGES_DIR",
                    help="folder of images (PNG, BMP, JPEG, TIFF); with no LABELS_DIR it also holds the label maps, "
                         "named X_anno, X_label(s), X_mask or X_gt")
    ft.add_argument("labels_dir", metavar="LABELS_DIR", nargs="?", default=None,
                    help="folder of label maps (default: IMAGES_DIR, GlaS-style X_anno files)")
    ft.add_argument("--base", default=DEFAULT_MODEL, help="model to start from (name or .safetensors path; default: %(default)s)")
    ft.add_argument("--name", required=True, help="name of the new user model")
    ft.add_argument("--iterations", type=int, default=ft_defaults.iterations,
                    help="optimizer steps, each on --batch-size random crops (default: %(default)s; a few minutes on a CPU)")
    ft.add_argument("--lr", type=float, default=ft_defaults.learning_rate,
                    help="peak learning rate (default: 3e-4 when only the head trains, 3e-5 otherwise)")
    ft.add_argument("--batch-size", type=int, default=ft_defaults.batch_size, help="crops per step (default: %(default)s)")
    ft.add_argument("--crop-size", type=int, default=ft_defaults.crop_size,
                    help="crop side at the model's working scale (default: %(default)s)")
    ft.add_argument("--no-augment", action="store_true", help="train on plain crops")
    ft.add_argument("--optimizer", choices=["adamw", "sgd"], default=ft_defaults.optimizer,
                    help="AdamW, or SGD with momentum 0.9 (default: %(default)s)")
    ft.add_argument("--replay", default=None, metavar="DIR",
                    help="a folder of image/label pairs from the data the base model was trained on, mixed into "
                         "training so that it does not forget that domain (pairs as for IMAGES_DIR)")
    ft.add_argument("--replay-share", type=float, default=ft_defaults.replay_share,
                    help="with --replay: share of the training crops drawn from it (default: %(default)s)")
    ft.add_argument("--augment-strength", type=float, default=ft_defaults.augment_strength,
                    help="scale of flips, rotations, elastic, colour and stain jitter, 0-2 (default: %(default)s)")
    ft.add_argument("--layers", choices=FINETUNE_LAYER_CHOICES, default=ft_defaults.layers,
                    help="which parameters train: all, decoder (all but the encoder), head (output layers only), "
                         "none (thresholds only: calibration on); auto: all when the corrected images hold 100+ "
                         "objects, else head (default: %(default)s)")
    ft.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=ft_defaults.calibrate,
                    help="after training, choose the watershed thresholds that segment the corrected images best "
                         "(default: only with --layers none)")
    ft.add_argument("--l2sp", type=float, default=ft_defaults.l2sp,
                    help="pull towards the base model's weights (L2-SP; 0: off; default: %(default)s)")
    ft.add_argument("--update-norm-stats", action="store_true",
                    help="let batch-norm statistics follow the new images (default: keep the base model's)")
    ft.add_argument("--val-fraction", type=float, default=ft_defaults.val_fraction,
                    help="share of the pairs held out for validation (default: %(default)s: train on all, no scores)")
    ft.add_argument("--eval-every", type=int, default=ft_defaults.eval_every,
                    help="with --val-fraction > 0: score the held-out pairs (object F1) every this many iterations "
                         "and at the end (default: %(default)s)")
    ft.add_argument("--patience", type=int, default=ft_defaults.patience,
                    help="with --val-fraction > 0: stop after this many scorings without a better object F1 and "
                         "keep the best checkpoint (0: never stop early; default: %(default)s)")
    ft.add_argument("--seed", type=int, default=ft_defaults.seed)
    ft.add_argument("--device", default=ft_defaults.device, help="auto, cpu, cuda, cuda:1 or mps")
    ft.add_argument("--overwrite", action="store_true", help="replace a user model of the same name")
    ft.set_defaults(func=cmd_finetune)

    ex = sub.add_parser("export", help="export a model to TorchScript, ONNX or a bioimage.io package "
                                       "(for QuPath, Fiji/DeepImageJ, onnxruntime)",
                        description="Write MODEL with its normalisation and softmax as TorchScript or ONNX, plus "
                                    "OUT.json with its configuration, or both in a bioimage.io model package "
                                    "(--format bioimageio, OUT a .zip: Fiji's DeepImageJ, ilastik). Input: float32 "
                                    "(N, 3, H, W) RGB in [0, 1] at the model's working scale, H and W multiples of "
                                    "size_multiple; output: class probabilities (N, C, H, W). See docs/export.md.")
    ex.add_argument("model", help="model name (see `glas-seg models`) or .safetensors path")
    # backend.export.FORMATS, written out: importing it would load torch (tests/test_export_bioimageio.py)
    ex.add_argument("--format", required=True, choices=["torchscript", "onnx", "bioimageio"])
    ex.add_argument("--out", required=True, help="output file (model.pt, model.onnx, or model.zip for bioimageio); "
                                                 "replaced if it exists")
    ex.add_argument("--mode", default=None, choices=["accurate", "fast"],
                    help="inference mode of models that have several (U-Net++)")
    ex.set_defaults(func=cmd_export)

    md = sub.add_parser("models", help="list, export, import, rename or delete models",
                        description="Without an action: list bundled and user models.")
    md.add_argument("--json", action="store_true", help="print the list as JSON")
    md.set_defaults(func=cmd_models, action=None)
    mds = md.add_subparsers(dest="action")
    ml = mds.add_parser("list", help="list models (default)")
    ml.add_argument("--json", dest="list_json", action="store_true", help="print the list as JSON")
    me = mds.add_parser("export", help="copy a model to a .safetensors file or folder")
    me.add_argument("name")
    me.add_argument("destination")
    me.add_argument("--overwrite", action="store_true")
    mi = mds.add_parser("import", help="validate a .safetensors model file and add it to the user models")
    mi.add_argument("file")
    mi.add_argument("--name", default=None, help="name in the store (default: the file name)")
    mi.add_argument("--overwrite", action="store_true")
    mx = mds.add_parser("delete", help="delete a user model")
    mx.add_argument("name")
    mr = mds.add_parser("rename", help="rename a user model")
    mr.add_argument("old")
    mr.add_argument("new")
    return parser


def _one_line(message: str) -> str:
    """Errors are printed on one line (scripts grep them; a traceback-like block hides the cause)."""
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # GlasSegError and the ValueErrors of older code: bad input or options
        print(f"glas-seg: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # files: missing input, no permission, disk full, a folder in the way
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"glas-seg: error: {_one_line(reason)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("glas-seg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
