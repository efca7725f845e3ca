"""Issue 17, property-style: generated malformed images, label maps and model configurations go
through segment, evaluate, finetune and model import (the Python API and the command line).

Whatever the input, the outcome is either success or a :class:`GlasSegError` whose message is
one line; never another exception type, never a partially written output file, never a change
to the user's model store (except the one model a successful fine-tune or import adds). The
cases are drawn from a seeded generator, so a failure names a case that can be replayed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import glas_seg
from _bad_input import cli, edited_model, glands_image, store_files, tiny_model, tiny_tensors, tree, write_image
from glas_seg.backend import model_store
from glas_seg.backend.errors import GlasSegError

SEED = 17


def outcome(call, *args, **kwargs):
    """Run ``call``; return its result, or the GlasSegError it raised (one-line message asserted).

    Any other exception propagates and fails the test: that is the property.
    """
    try:
        return call(*args, **kwargs)
    except GlasSegError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(exc)
        return exc


# -- generated inputs --------------------------------------------------------------------------
SHAPES = [(64, 64, 3), (64, 64), (64, 64, 1), (64, 64, 2), (64, 64, 4), (64, 64, 5), (8, 8, 3), (15, 64, 3),
          (2, 64, 64, 3), (64,), (1, 1), (64, 64, 3, 2)]
DTYPES = [np.uint8, np.uint16, np.int16, np.int64, np.float32, np.float64, np.bool_, np.complex64]
SPECIALS = ["plain", "nan", "inf", "negative", "huge", "constant"]


def _pixels(rng, shape, dtype, special) -> np.ndarray:
    values = rng.random(shape) * 255
    if special == "negative":
        values -= 300
    elif special == "huge":
        values *= 1e12
    elif special == "constant":
        values[...] = 7
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(values, info.min, info.max)
    array = values.astype(dtype)
    if special in ("nan", "inf") and np.dtype(dtype).kind in "fc":
        array.flat[:: max(1, array.size // 5)] = np.nan if special == "nan" else np.inf
    return array


def image_cases() -> list[tuple[str, callable]]:
    """(name, write(folder) -> path): 20 random arrays as TIFF plus damaged and unusual files."""
    rng = np.random.default_rng(SEED)
    cases = []
    for i in range(20):
        shape = SHAPES[rng.integers(len(SHAPES))]
        dtype = DTYPES[rng.integers(len(DTYPES))]
        special = SPECIALS[rng.integers(len(SPECIALS))]
        array = _pixels(rng, shape, dtype, special)
        name = f"array{i}-{'x'.join(map(str, shape))}-{np.dtype(dtype).name}-{special}"
        cases.append((name, lambda folder, a=array, n=name: _tiff(folder / f"{n}.tif", a)))
    rgb = glands_image()[0]
    png = (lambda folder: _bytes(folder / "truncated.png", _png_bytes(rgb)[:200]))
    cases += [
        ("truncated png", png),
        ("empty file", lambda folder: _bytes(folder / "empty.png", b"")),
        ("text named jpg", lambda folder: _bytes(folder / "text.jpg", b"not an image at all\n")),
        ("cmyk jpeg", lambda folder: _pil(folder / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))),
        ("palette png", lambda folder: _pil(folder / "palette.png", Image.fromarray(rgb).convert("P"))),
        ("rgba png", lambda folder: _pil(folder / "rgba.png", Image.fromarray(rgb).convert("RGBA"))),
        ("16-bit grey png", lambda folder: _pil(folder / "grey16.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 200))),
        ("cmyk tiff", lambda folder: _pil(folder / "cmyk.tif", Image.fromarray(rgb).convert("CMYK"))),
    ]
    return cases


def _tiff(path, array):
    tifffile.imwrite(path, array)
    return path


def _bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def _pil(path, image):
    image.save(path)
    return path


def _png_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


LABEL_MUTATIONS = {
    "valid": lambda labels, rng: labels,
    "negative ids": lambda labels, rng: -labels,
    "one negative pixel": lambda labels, rng: np.where(np.arange(labels.size).reshape(labels.shape) == 5, -1, labels),
    "float ids": lambda labels, rng: labels.astype(np.float32) + 0.5,
    "huge ids": lambda labels, rng: labels.astype(np.int64) * 2**40,
    "uint64 top ids": lambda labels, rng: np.where(labels > 0, np.uint64(2**63 + 5), np.uint64(0)),
    "bool": lambda labels, rng: labels > 0,
    "rgb unequal": lambda labels, rng: rng.integers(0, 4, labels.shape + (3,)).astype(np.uint8),
    "rgb equal": lambda labels, rng: np.repeat(labels[..., None], 3, axis=-1).astype(np.uint8),
    "stack": lambda labels, rng: np.stack([labels, labels]),
    "smaller": lambda labels, rng: labels[:-1],
    "empty": lambda labels, rng: np.zeros_like(labels),
    "1D": lambda labels, rng: labels.ravel(),
    "int8 wrapped": lambda labels, rng: (labels * 100).astype(np.int8),
}


def label_cases() -> list[tuple[str, str, np.ndarray]]:
    """(name, side, array): every mutation once on a random side, plus random repeats."""
    rng = np.random.default_rng(SEED + 1)
    labels = glands_image()[1]
    names = list(LABEL_MUTATIONS) + list(rng.choice(list(LABEL_MUTATIONS), 4))
    cases = []
    for i, name in enumerate(names):
        side = ["prediction", "ground truth"][rng.integers(2)]
        cases.append((f"{i}-{name}-{side}", side, LABEL_MUTATIONS[name](labels, rng)))
    return cases


BAD_VALUES = {
    "scale": [0, -1, 1e-6, 100, "1", [0.5], None, True, math.nan, math.inf],
    "mean": [[0.5, 0.5], [0.5] * 4, "0.5", [None] * 3, [], [math.nan] * 3],
    "std": [[0, 0, 0], [-1, 1, 1], [0.25] * 2, "x", [math.inf] * 3],
    "class_names": [[], ["a"], ["a", "b", "c", "d"], [1, 2, 3], "abc", None],
    "tile_size": [0, -64, 64.5, "64", 10**9, True],
    "min_size": [-1, 1.5, "10", None],
    "task": ["cats", 1, None],
    "targets": ["middle", 1, None],
    "architecture": ["nope", 5, None, ["unet"]],
    "arch_kwargs": [[], "x", {"width": -1}, {"bogus": 1}, {"width": 10**6}, {"width": "4"}, {"": 1}],
    "training": ["x", [1], 5, None],
    "name": [None, 5, ""],
    "base_model": [5, []],
    "description": [5, None],
    "format_version": [0, 2, "1", None],
}
RAW_CONFIGS = ["", "null", "[]", '"unet"', "{", '{"name": "x"}', "1e400", '{"architecture": "unet"}']


def config_cases() -> list[tuple[str, str | None, dict | None]]:
    """(name, raw text or None, changes or None): random 1-3 field faults, raw texts, tensor faults."""
    rng = np.random.default_rng(SEED + 2)
    cases = []
    for i in range(20):
        fields = rng.choice(sorted(BAD_VALUES), size=rng.integers(1, 4), replace=False)
        changes = {str(f): BAD_VALUES[str(f)][rng.integers(len(BAD_VALUES[str(f)]))] for f in fields}
        cases.append((f"fields{i}-{'+'.join(changes)}", None, changes))
    cases += [(f"raw-{text[:12]}", text, None) for text in RAW_CONFIGS]
    cases.append(("tiny but valid std", None, {"std": [1e-3, 1e-3, 1e-3]}))
    return cases


def tensor_cases() -> dict[str, dict]:
    tensors = tiny_tensors()
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    return {
        "int32 weights": {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tensors.items()},
        "float16 weights": {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
        "bfloat16 weights": {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors.items()},
        "float64 weights": {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()},
        "missing weight": {k: v for k, v in tensors.items() if k != key},
        "extra weight": {**tensors, "extra.weight": torch.zeros(3)},
        "misshaped weight": {**tensors, key: torch.zeros(2, 2)},
        "inf weight": {**tensors, key: torch.full_like(tensors[key], math.inf)},
        "integer running stats": {k: v.long() if "running" in k else v for k, v in tensors.items()},
    }


# -- the property --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def test_generated_case_counts():
    assert len(image_cases()) + len(label_cases()) + len(config_cases()) + len(tensor_cases()) >= 30


def test_malformed_images_through_segment(tmp_path, model, capsys, one_torch_thread):
    loaded = glas_seg.load_model(model, device="cpu")
    before = store_files()
    for name, write in image_cases():
        folder = tmp_path / name
        folder.mkdir()
        path = write(folder)
        image = outcome(glas_seg.read_image, path)
        if not isinstance(image, GlasSegError):
            result = outcome(glas_seg.segment, image, loaded)
            if not isinstance(result, GlasSegError):
                assert result.labels.shape == image.shape[:2], name
        out = tmp_path / f"{name}-out"
        code, err = cli(capsys, "segment", path, "--out", out, "--model", model)
        assert code in (0, 1) and "Traceback" not in err, (name, err)
        written = tree(out)
        if code == 0:  # complete and readable, at the image's size
            assert written == [f"{path.stem}_labels.tif"], name
            assert tifffile.imread(out / written[0]).shape == glas_seg.read_image(path).shape[:2], name
        else:  # skipped: nothing written, no temporary file
            assert written == [], (name, written)
    assert store_files() == before


def test_malformed_label_maps_through_evaluate_and_finetune(tmp_path, model, capsys, one_torch_thread):
    image, valid = glands_image()
    before = store_files()
    for name, side, array in label_cases():
        pred, gt = tmp_path / name / "pred", tmp_path / name / "gt"
        pred.mkdir(parents=True)
        gt.mkdir()
        tifffile.imwrite(pred / "x_labels.tif", array if side == "prediction" else valid)
        tifffile.imwrite(gt / "x.tif", array if side == "ground truth" else valid)

        report = outcome(glas_seg.evaluate, pred / "x_labels.tif", gt / "x.tif")
        out = tmp_path / name / "out"
        code, err = cli(capsys, "evaluate", pred, gt, "--csv", out / "s.csv", "--json", out / "s.json")
        assert "Traceback" not in err, (name, err)
        if isinstance(report, GlasSegError):
            assert code == 2 and tree(out) == [], (name, err)
        else:
            assert code == 0 and tree(out) == ["s.csv", "s.json"], (name, err)
            json.loads((out / "s.json").read_text())

        labels = gt / "x.tif" if side == "ground truth" else pred / "x_labels.tif"
        Image.fromarray(image).save(tmp_path / name / "x.png")
        result = outcome(glas_seg.finetune, [tmp_path / name / "x.png"], [labels], "ft", base=model, iterations=1,
                         batch_size=1, crop_size=32, device="cpu", augment=False)
        if isinstance(result, GlasSegError):
            assert store_files() == before, name
        else:
            assert store_files() == sorted(before + ["ft.safetensors"]), name
            model_store.delete_model("ft")
    assert store_files() == before


def _check_imported(path, image, capsys):
    """Import through the API and the CLI: success adds one loadable model, failure changes nothing."""
    before = store_files()
    entry = outcome(model_store.import_model, path, name="imported")
    if isinstance(entry, GlasSegError):
        assert store_files() == before, (path.name, entry)
        code, err = cli(capsys, "models", "import", path, "--name", "imported")
        assert code == 2 and "Traceback" not in err and store_files() == before, (path.name, err)
        return entry
    assert store_files() == sorted(before + ["imported.safetensors"])
    result = outcome(glas_seg.segment, image, "imported", device="cpu")
    if not isinstance(result, GlasSegError):
        assert result.labels.shape == image.shape[:2]
    model_store.delete_model("imported")
    return entry


def test_malformed_model_configurations_through_import(tmp_path, capsys, one_torch_thread):
    image = glands_image()[0]
    refused = 0
    for name, text, changes in config_cases():
        path = edited_model(tmp_path / f"case{refused}-{len(name)}.safetensors", config_text=text, **(changes or {}))
        refused += isinstance(_check_imported(path, image, capsys), GlasSegError)
    assert refused >= len(config_cases()) - 1  # all but the one valid case


def test_malformed_model_weights_through_import(tmp_path, capsys, one_torch_thread):
    image = glands_image()[0]
    accepted = []
    for name, tensors in tensor_cases().items():
        path = edited_model(tmp_path / f"{name.replace(' ', '_')}.safetensors", tensors=tensors)
        if not isinstance(_check_imported(path, image, capsys), GlasSegError):
            accepted.append(name)
    assert accepted == ["float16 weights", "bfloat16 weights", "float64 weights"]
