"""One slide split across dask workers (issue 15): the windows are segmented on a LocalCluster of
2 worker processes and painted here in chunk order, giving the same label store as in-process;
cancel keeps what was painted and a resumed run does only the rest; the batch's --split-slides."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import tifffile

from glas_seg.backend.batch import SegmentOptions, dask_client, read_manifest, run_batch
from glas_seg.backend.image_io import read_image
from glas_seg.backend.progress import Cancelled
from glas_seg.backend.registry import find_model, load_model
from glas_seg.backend.slide import open_slide
from glas_seg.backend.slide_segment import WindowJob, open_labels, segment_slide, segment_window

from _bad_input import assert_one_line_error, cli
from conftest import REPO
from test_batch import write_pyramid

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Small chunks so that a small slide has many (12), with glands across their borders.
CHUNKS = {"chunk_size": 256, "halo": 64}


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes (one thread each), as `--workers 2` starts."""
    with dask_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """The packaged GlaS sample (433 x 574 px) on blank glass: a 2-level pyramidal TIFF at 0.62 um/px."""
    image = read_image(REPO / "src" / "glas_seg" / "sample_data" / "glas_train_12.png")[..., :3]
    canvas = np.full((image.shape[0] + 200, image.shape[1] + 300, 3), 242, np.uint8)
    canvas[100 : 100 + image.shape[0], 150 : 150 + image.shape[1]] = image
    return write_pyramid(tmp_path_factory.mktemp("slide") / "sample.tif", canvas, mpp=0.62, levels=2)


@pytest.fixture(scope="module")
def in_process(slide, tmp_path_factory, one_torch_thread):
    """The reference: the slide segmented in this process."""
    return segment_slide(load_model("unet-glands", "cpu"), slide, tmp_path_factory.mktemp("ref") / "ref.zarr",
                         **CHUNKS)


def assert_same_store(result, reference):
    ours, theirs = open_labels(result.store), open_labels(reference.store)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert np.array_equal(a[:], b[:])
    assert result.objects == reference.objects
    assert (result.chunks, result.chunks_with_tissue) == (reference.chunks, reference.chunks_with_tissue)


def test_window_jobs_and_results_are_picklable(slide):
    """What travels to and from a worker: a job (a path and numbers) and its result."""
    job = WindowJob(str(slide), 0, (0, 300, 0, 400), (0, 256, 0, 256), (0, 0), (633, 874), 1.0, 10, True,
                    (("overlap", 0.25), ("tile_size", None)))
    assert pickle.loads(pickle.dumps(job)) == job
    with open_slide(slide) as reader:
        result = segment_window(load_model("unet-glands", "cpu"), reader, job)
    again = pickle.loads(pickle.dumps(result))
    assert again.labels.dtype == np.int32 and again.labels.shape == (300, 400)
    assert np.array_equal(again.labels, result.labels) and again.pieces == result.pieces
    assert again.probabilities == result.probabilities and again.pieces  # glands in that corner


def test_split_across_workers_gives_the_same_store(slide, in_process, client, tmp_path):
    assert len(in_process.objects) >= 10  # glands, some across chunk borders: a meaningful comparison
    seen = []
    result = segment_slide("unet-glands", slide, tmp_path / "split.zarr", device="cpu", client=client,
                           progress=lambda done, total: seen.append((done, total)), **CHUNKS)
    assert_same_store(result, in_process)
    assert seen == [(k, in_process.chunks_with_tissue) for k in range(in_process.chunks_with_tissue + 1)]
    # Each worker loaded the model at most once (its cache), and both took windows.
    loaded = client.run(lambda: len(__import__("glas_seg.backend.batch", fromlist=["_MODELS"])._MODELS))
    assert sorted(loaded.values()) == [1, 1]


def test_cancelled_split_run_keeps_what_was_painted_and_resumes(slide, in_process, client, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done == 4:
            cancel.set()

    options = SegmentOptions(str(find_model("unet-glands").path.resolve()), "unet-glands", device="cpu")
    with pytest.raises(Cancelled):
        segment_slide(load_model("unet-glands", "cpu"), slide, tmp_path / "out.zarr", client=client,
                      worker_options=options, progress=progress, cancel=cancel, **CHUNKS)
    assert seen[-1] == 4
    seen.clear()
    result = segment_slide("unet-glands", slide, tmp_path / "out.zarr", device="cpu", client=client,
                           progress=lambda done, total: seen.append(done), **CHUNKS)
    assert seen[0] == 4  # only the chunks not in the manifest were segmented again
    assert_same_store(result, in_process)


def test_a_loaded_model_needs_worker_options(slide, client, tmp_path):
    from glas_seg.backend.errors import GlasSegError

    with pytest.raises(GlasSegError, match="worker_options"):
        segment_slide(load_model("unet-glands", "cpu"), slide, tmp_path / "x.zarr", client=client, **CHUNKS)


def test_batch_split_slides_matches_in_process(slide, client, tmp_path):
    entry = find_model("unet-glands")
    options = SegmentOptions(str(entry.path.resolve()), entry.name, device="cpu")
    jobs = [(slide, "sample_labels.tif")]
    here = run_batch(jobs, tmp_path / "here", options)
    there = run_batch(jobs, tmp_path / "there", options, client=client, executor="LocalCluster(2)",
                      split_slides=True)
    assert len(here.done) == len(there.done) == 1 and not there.failed
    assert np.array_equal(tifffile.imread(tmp_path / "here" / "sample_labels.tif"),
                          tifffile.imread(tmp_path / "there" / "sample_labels.tif"))
    assert (tmp_path / "here" / "sample_objects.csv").read_text() == (tmp_path / "there" / "sample_objects.csv").read_text()
    manifest = read_manifest(tmp_path / "there")
    [record] = manifest["inputs"].values()
    assert record["split_across"] == 2 and manifest["runs"][-1]["split_slides"] is True


def test_cli_split_slides_needs_workers(tmp_path, capsys):
    code, err = cli(capsys, "segment", tmp_path / "a.png", "--out", tmp_path / "out", "--split-slides")
    assert_one_line_error(code, err, "--split-slides")
