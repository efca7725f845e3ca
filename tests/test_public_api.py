"""The flat public API: ``import glas_seg`` is cheap and gives segment / load_model / list_models /
evaluate / finetune with explicit keyword arguments and one progress / cancel contract."""

from __future__ import annotations

import inspect
import subprocess
import sys
import threading

import numpy as np
import pytest

from glas_seg.backend.checkpoint import read_config

import glas_seg
from glas_seg import Cancelled, GlasSegError

from conftest import REPO

SAMPLE = REPO / "src" / "glas_seg" / "sample_data" / "glas_train_12.png"
SAMPLE_LABELS = REPO / "src" / "glas_seg" / "sample_data" / "glas_train_12_anno.png"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _modules_after(code: str) -> set[str]:
    """Top-level modules imported by a fresh interpreter running ``code``."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split("\n")[-2].split())


@pytest.mark.parametrize("code", [
    "import glas_seg",
    "import glas_seg; glas_seg.list_models(); glas_seg.GlasSegError; glas_seg.Cancelled",
    "from glas_seg.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from glas_seg.cli import main\ntry:\n    main(['segment', '--help'])\nexcept SystemExit:\n    pass",
    "from glas_seg.cli import main; main(['models'])",
    "from glas_seg.cli import main; main(['models', '--json'])",
])
def test_import_listing_and_help_never_import_torch(code):
    modules = _modules_after(code)
    assert not {"torch", "torchvision", "napari", "qtpy"} & modules


def test_all_names_resolve_and_take_explicit_keywords():
    assert set(glas_seg.__all__) >= {"segment", "load_model", "list_models", "evaluate", "finetune",
                                      "read_image", "GlasSegError", "Cancelled"}
    for name in glas_seg.__all__:
        obj = getattr(glas_seg, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and "Parameters" in obj.__doc__ or name.startswith("read_"), name
            kinds = {p.kind for p in inspect.signature(obj).parameters.values()}
            assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name} hides options in **kwargs"
    with pytest.raises(AttributeError):
        glas_seg.no_such_function


def test_list_models_filters_and_names_its_number():
    nuclei = glas_seg.list_models(task="nuclei", source="bundled")
    assert nuclei and all(e.config.task == "nuclei" for e in nuclei)
    unet = next(e for e in glas_seg.list_models() if e.name == "unet-glands")
    assert unet.validation_score == pytest.approx(unet.config.training["validation"]["object_f1_pooled"])
    with pytest.raises(GlasSegError):
        glas_seg.list_models(task="cells")


def test_segment_by_name_and_loaded_model_agree_and_report_progress():
    image = glas_seg.read_image(SAMPLE)
    calls = []
    result = glas_seg.segment(image, "unet-glands", device="cpu", progress=lambda done, total: calls.append((done, total)))
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.int32 and result.labels.max() >= 8
    assert calls and calls[-1][0] == calls[-1][1] and all(total == calls[0][1] for _, total in calls)
    model = glas_seg.load_model("unet-glands", device="cpu")
    np.testing.assert_array_equal(glas_seg.segment(image, model).labels, result.labels)


def test_segment_cancel_and_bad_input():
    image = glas_seg.read_image(SAMPLE)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        glas_seg.segment(image, device="cpu", cancel=stop)
    with pytest.raises(Cancelled):
        glas_seg.segment(image, device="cpu", cancel=lambda: True)
    for bad in (dict(overlap=1.5), dict(tile_size=0), dict(min_size=-1), dict(cancel=5), dict(progress="x"),
                dict(model="no-such-model"), dict(model=3.0)):
        with pytest.raises(GlasSegError):
            glas_seg.segment(image, **bad)
    with pytest.raises(GlasSegError):
        glas_seg.segment(np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(GlasSegError):
        glas_seg.segment(str(SAMPLE))
    with pytest.raises(GlasSegError, match="tta"):
        glas_seg.segment(image, "maskrcnn-glands", device="cpu", tta=True)


def test_evaluate_one_pair_lists_and_files(touching_squares):
    report = glas_seg.evaluate(touching_squares, touching_squares)
    assert report.pooled["object_f1"] == 1.0 and list(report.images) == ["image_1"]
    missing_one = np.where(touching_squares == 5, 0, touching_squares)
    calls = []
    report = glas_seg.evaluate([touching_squares, missing_one], [touching_squares] * 2, names=["a", "b"],
                               progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]
    assert report.images["b"].row["fn"] == 1 and report.pooled["object_f1"] == pytest.approx(10 / 11)
    from_files = glas_seg.evaluate(SAMPLE_LABELS, SAMPLE_LABELS)
    assert list(from_files.images) == ["glas_train_12_anno"] and from_files.pooled["object_f1"] == 1.0
    with pytest.raises(GlasSegError):
        glas_seg.evaluate(touching_squares, touching_squares[:10])
    with pytest.raises(GlasSegError):
        glas_seg.evaluate([touching_squares], [touching_squares] * 2)
    with pytest.raises(Cancelled):
        glas_seg.evaluate(touching_squares, touching_squares, cancel=lambda: True)


def test_finetune_saves_a_user_model_with_the_same_progress_contract():
    image, labels = glas_seg.read_image(SAMPLE), glas_seg.read_labels(SAMPLE_LABELS)
    steps, events = [], []
    result = glas_seg.finetune(image, labels, "api-ft", iterations=2, batch_size=1, crop_size=64, device="cpu",
                               progress=lambda done, total: steps.append((done, total)), on_event=events.append)
    assert steps == [(1, 2), (2, 2)] and [e["iteration"] for e in events] == [1, 2]
    assert result.entry.name == "api-ft" and result.entry.source == "user"
    assert "api-ft" in [e.name for e in glas_seg.list_models(source="user")]
    with pytest.raises(Cancelled):
        glas_seg.finetune([image], [labels], "api-ft-cancelled", iterations=2, crop_size=64, device="cpu",
                          cancel=lambda: True)
    assert "api-ft-cancelled" not in [e.name for e in glas_seg.list_models()]
    with pytest.raises(GlasSegError):
        glas_seg.finetune(image, labels, "unet-glands", iterations=1)  # a bundled model's name
    with pytest.raises(GlasSegError):
        glas_seg.finetune([image, image], [labels], "x", iterations=1)
    with pytest.raises(GlasSegError, match="together"):
        glas_seg.finetune(image, labels, "x", iterations=1, replay_images=[image])
    mixed = glas_seg.finetune(image, labels, "api-replay", iterations=1, batch_size=1, crop_size=64, device="cpu",
                              layers="all", optimizer="sgd", replay_images=[image[:200, :300]],
                              replay_labels=[labels[:200, :300]], replay_share=0.3)
    training = read_config(mixed.entry.path).training
    assert training["replay_images"] == ["replay_1"] and training["settings"]["optimizer"] == "sgd"


def test_cli_segment_says_where_it_wrote_and_help_names_defaults(tmp_path, capsys):
    from glas_seg.backend.registry import DEFAULT_MODEL
    from glas_seg.cli import build_parser, main

    assert main(["segment", str(SAMPLE), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"wrote 1 label map(s) (<image stem>_labels.tif) to {(tmp_path / 'out').resolve()}" in err
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert f"(default: {DEFAULT_MODEL})" in " ".join(subcommands["segment"].format_help().split())
    finetune_help = " ".join(subcommands["finetune"].format_help().split())
    for explained in ("IMAGES_DIR folder of images", "--iterations ITERATIONS optimizer steps",
                      "--eval-every EVAL_EVERY with --val-fraction"):
        assert explained in finetune_help
