"""``glas-seg segment-slide``: a whole-slide image (or a region of it) -> labels and object tables.

Kept apart from :mod:`.cli` so that the slide command's options live next to its code; cli.py
only registers it (:func:`add_parser`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _region(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected x,y,width,height in base-level pixels, not {text!r}")
    return values


def cmd_segment_slide(args: argparse.Namespace) -> int:
    from .backend.outputs import output_folder
    from .backend.registry import load_model, pick_device
    from .backend.slide import open_slide
    from .backend.slide_export import export_objects, write_labels_tiff
    from .backend.slide_segment import open_labels, segment_slide
    from .backend.validate import check_segment_options
    from .cli import _progress_bar

    check_segment_options(args.tile_size, args.overlap, min_size=args.min_size)
    pick_device(args.device)
    out = output_folder(args.out, "--out")
    name = Path(args.slide).name
    stem = next((name[: -len(suffix)] for suffix in (".ome.tiff", ".ome.tif") if name.lower().endswith(suffix)),
                Path(args.slide).stem)
    with open_slide(args.slide) as reader, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(args.model, args.device, mode=args.mode)
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = _progress_bar(total, f"{stem}", "chunk")
                bar.update(done)
            else:
                bar.update(done - bar.n)

        try:
            result = segment_slide(model, reader, out / f"{stem}_labels.zarr", mpp=args.mpp, region=args.region,
                                   level=args.level, chunk_size=args.chunk_size, min_size=args.min_size,
                                   mask_glass=not args.keep_glass, resume=not args.restart, progress=progress,
                                   tile_size=args.tile_size, overlap=args.overlap, tta=args.tta)
        finally:
            if bar is not None:
                bar.close()
        for warning in caught:
            print(f"glas-seg: warning: {warning.message}", file=sys.stderr)
    written = [result.store]
    levels = open_labels(result.store)
    if not args.no_tiff:
        written.append(write_labels_tiff(levels, out / f"{stem}_labels.tif", result.mpp))
    geojson = None if args.no_geojson else out / f"{stem}_objects.geojson"
    table = None if args.no_csv else out / f"{stem}_objects.csv"
    if geojson or table:
        export_objects(levels[0], result.objects, mpp=result.mpp, origin=result.origin, task=model.config.task,
                       geojson=geojson, csv_path=table)
        written += [p for p in (geojson, table) if p]
    print(f"{len(result.objects)} {model.config.task} in {result.chunks_with_tissue} of {result.chunks} chunks "
          f"(tissue), {result.seconds:.0f} s; wrote {', '.join(p.name for p in written)} to {out.resolve()}",
          file=sys.stderr)
    return 0


def add_parser(sub, default_model: str, default_overlap: float) -> argparse.ArgumentParser:
    """Register ``segment-slide`` on the ``glas-seg`` subparsers."""
    sl = sub.add_parser(
        "segment-slide", help="segment a whole-slide image (SVS, NDPI, MRXS, SCN, OME-TIFF...) in bounded memory",
        description="Segment the tissue of a whole-slide image chunk by chunk and write, in --out: "
                    "<stem>_labels.zarr (label pyramid, resumable), <stem>_labels.tif (tiled pyramidal uint32 "
                    "labels, base level = the slide's or the region's), <stem>_objects.geojson (QuPath: one "
                    "polygon per object, base-level pixel coordinates) and <stem>_objects.csv (one row per id). "
                    "The slide is resampled to the model's pixel size; an interrupted run resumes when started "
                    "again with the same options.")
    sl.add_argument("slide", help="slide file (OpenSlide formats, OME-TIFF or pyramidal TIFF)")
    sl.add_argument("--out", required=True, help="output folder (created if missing)")
    sl.add_argument("--model", default=default_model, help=f"model name or .safetensors path (default: {default_model})")
    sl.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    sl.add_argument("--mpp", type=float, default=None,
                    help="micrometres per base-level pixel (default: from the slide; without either, the model's "
                         "own pixel size is assumed with a warning)")
    sl.add_argument("--region", type=_region, default=None,
                    help="x,y,width,height in base-level pixels (default: the whole slide)")
    sl.add_argument("--level", type=int, default=None,
                    help="pyramid level to read (default: the coarsest at least as sharp as the model needs)")
    sl.add_argument("--chunk-size", type=int, default=2048,
                    help="chunk side in pixels at the model's pixel size (default: %(default)s); memory grows with "
                         "its square")
    sl.add_argument("--tile-size", type=int, default=None, help="tile side in network pixels")
    sl.add_argument("--overlap", type=float, default=default_overlap,
                    help="tile overlap fraction (default: %(default)s)")
    sl.add_argument("--min-size", type=int, default=None, help="smallest object kept, in pixels at the model's size")
    sl.add_argument("--tta", action="store_true", help="average over flips (slower, slightly better)")
    sl.add_argument("--keep-glass", action="store_true",
                    help="do not treat blank glass at a chunk's tissue edge as background")
    sl.add_argument("--mode", default=None, choices=["accurate", "fast"], help="U-Net++ inference mode")
    sl.add_argument("--restart", action="store_true", help="start afresh instead of resuming an interrupted run")
    sl.add_argument("--no-tiff", action="store_true", help="do not write <stem>_labels.tif")
    sl.add_argument("--no-geojson", action="store_true", help="do not write <stem>_objects.geojson")
    sl.add_argument("--no-csv", action="store_true", help="do not write <stem>_objects.csv")
    sl.set_defaults(func=cmd_segment_slide)
    return sl
