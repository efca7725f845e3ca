"""Batch segmentation: in-process and on a dask LocalCluster (2 processes), the manifest, resuming
after a kill, one bad file failing alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from glas_seg.backend.batch import MANIFEST_NAME, SegmentOptions, dask_client, read_manifest, run_batch
from glas_seg.backend.errors import GlasSegError

from _bad_input import assert_one_line_error, cli, glands_image, tiny_model
from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_images(folder, count: int, size: int = 96) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        imsave(folder / f"img{k}.png", glands_image(k, size)[0], check_contrast=False)
        paths.append(folder / f"img{k}.png")
    return paths


def write_pyramid(path, image: np.ndarray, mpp: float, levels: int = 2):
    """A tiled pyramidal TIFF (a slide for glas-seg): the base level, then halved ``levels - 1`` times."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=levels - 1, tile=(128, 128), compression="zlib",
                  resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        for i in range(1, levels):
            tif.write(image[:: 2**i, :: 2**i], subfiletype=1, tile=(128, 128), compression="zlib")
    return path


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes, one thread each, shared by this module's tests."""
    with dask_client(workers=2) as c:
        yield c


@pytest.fixture
def model(tmp_path):
    return tiny_model(tmp_path / "models" / "tiny.safetensors")


def test_local_cluster_matches_in_process_and_keeps_one_model_per_worker(tmp_path, model, client):
    images = write_images(tmp_path / "in", 3)
    # A whole-slide image is one unit of work too: a 2-level pyramidal TIFF at the model's 0.62 um/px.
    slide = write_pyramid(tmp_path / "in" / "slide.tif", np.tile(glands_image(7, 128)[0], (4, 5, 1)), mpp=0.62, levels=2)
    images.append(slide)
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"not an image")
    jobs = [(p, f"{p.stem}_labels.tif") for p in [*images, bad]]
    options = SegmentOptions(model_path=str(model), model_name="tiny", device="cpu")

    here = run_batch(jobs, tmp_path / "here", options)
    there = run_batch(jobs, tmp_path / "there", options, client=client, executor="LocalCluster(2)")

    for summary in (here, there):
        assert len(summary.done) == 4 and [f[0] for f in summary.failed] == [str(bad.resolve())]
        assert "Could not read image broken.png" in summary.failed[0][1]
    for path in images:  # the same label maps, whichever process made them
        name = f"{path.stem}_labels.tif"
        assert np.array_equal(tifffile.imread(tmp_path / "here" / name), tifffile.imread(tmp_path / "there" / name))
    manifest = read_manifest(tmp_path / "there")
    entries = manifest["inputs"]
    assert entries[str(bad.resolve())]["state"] == "failed" and entries[str(bad.resolve())]["message"]
    done = [e for e in entries.values() if e["state"] == "done"]
    slide_entry = entries[str(slide.resolve())]
    assert slide_entry["slide"] and [Path(p).name for p in slide_entry["outputs"]] == [
        "slide_labels.zarr", "slide_labels.tif", "slide_objects.geojson", "slide_objects.csv"]
    assert tifffile.imread(tmp_path / "there" / "slide_labels.tif").shape == (512, 640)
    assert len(done) == 4 and all(e["seconds"]["total"] > 0 and e["outputs"] for e in done)
    assert all(e["worker"].split(":")[1] != str(os.getpid()) for e in done)  # ran on the workers
    # Each worker process loaded the model at most once and kept it.
    loaded = client.run(lambda: len(__import__("glas_seg.backend.batch", fromlist=["_MODELS"])._MODELS))
    assert len(loaded) == 2 and all(n <= 1 for n in loaded.values()) and sum(loaded.values()) >= 1

    again = run_batch(jobs, tmp_path / "there", options, client=client)
    assert sorted(again.skipped) == sorted(str(p.resolve()) for p in images)  # done ones are skipped
    assert not again.done and len(again.failed) == 1  # the bad one is tried again, and fails again


def test_cli_cluster_address_and_bad_addresses(tmp_path, model, client, capsys):
    images = write_images(tmp_path / "in", 2)
    code, err = cli(capsys, "segment", *images, "--out", tmp_path / "out", "--model", model,
                    "--cluster", client.scheduler.address, "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST_NAME, "img0_labels.tif", "img1_labels.tif"]
    # An OME-TIFF slide gets the names segment-slide gives it (x.ome.tif -> x_labels.tif ...).
    from glas_seg.cli import _label_targets

    assert [n for _, n in _label_targets(["a/x.ome.tif", "b/y.OME.TIFF", "c/z.png"])] == [
        "x_labels.tif", "y_labels.tif", "z_labels.tif"]
    code, err = cli(capsys, "segment", *images, "--out", tmp_path / "out2", "--model", model, "--workers", "0")
    assert_one_line_error(code, err, "--workers")
    code, err = cli(capsys, "segment", *images, "--out", tmp_path / "out2", "--model", model,
                    "--workers", "2", "--cluster", "tcp://127.0.0.1:1")
    assert_one_line_error(code, err, "not both")


def test_unreachable_scheduler_is_one_clear_error():
    with pytest.raises(GlasSegError, match="cannot reach the dask scheduler"):
        with dask_client("tcp://127.0.0.1:9", timeout="2s"):
            pass


def test_changed_settings_redo_everything(tmp_path, model):
    images = write_images(tmp_path / "in", 2, size=64)
    jobs = [(p, f"{p.stem}_labels.tif") for p in images]
    options = SegmentOptions(model_path=str(model), model_name="tiny", device="cpu")
    assert len(run_batch(jobs, tmp_path / "out", options).done) == 2
    assert len(run_batch(jobs, tmp_path / "out", options).skipped) == 2
    (tmp_path / "out" / "img1_labels.tif").unlink()  # a lost output is made again
    summary = run_batch(jobs, tmp_path / "out", options)
    assert summary.skipped == [str(images[0].resolve())] and summary.done == [str(images[1].resolve())]
    changed = run_batch(jobs, tmp_path / "out", SegmentOptions(str(model), "tiny", device="cpu", min_size=3))
    assert changed.settings_changed and len(changed.done) == 2 and len(changed.replaced) == 2
    assert [r["executor"] for r in read_manifest(tmp_path / "out")["runs"]] == ["in-process"] * 4


def test_a_killed_run_resumes_without_redoing_what_is_done(tmp_path, model, capsys):
    """SIGKILL half-way (no chance to clean up), then the same command finishes the rest."""
    images = write_images(tmp_path / "in", 10, size=320)
    out = tmp_path / "out"
    argv = ["segment", *map(str, images), "--out", str(out), "--model", str(model), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "glas_seg.cli", *argv], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done: list = []
    while time.monotonic() < deadline and process.poll() is None:
        manifest = read_manifest(out)
        done = [k for k, e in (manifest or {}).get("inputs", {}).items() if e["state"] == "done"]
        if done:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    manifest = json.loads((out / MANIFEST_NAME).read_text())  # still readable: written atomically
    done = {k: e["outputs"][0] for k, e in manifest["inputs"].items() if e["state"] == "done"}
    assert 1 <= len(done) < len(images), "the run must be killed half-way for this test to mean anything"
    before = {path: os.stat(path) for path in done.values()}

    code, err = cli(capsys, *argv)
    assert code == 0, err
    assert f"{len(done)} image(s) already done" in err
    for path, stat in before.items():  # not rewritten: same file (atomic rename makes a new inode)
        now = os.stat(path)
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    states = {e["state"] for e in read_manifest(out)["inputs"].values()}
    assert states == {"done"}
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, *(f"{p.stem}_labels.tif" for p in images)])
    # (no temporary file of the killed run is left)
