import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Every test that reads ../shared/data, directly or through another fixture, is ``realdata``:
    ``-m "not realdata"`` runs the suite without the data sets."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need it fail (not skip) when it is missing."""
    assert SHARED_DATA.is_dir(), f"real data expected at {SHARED_DATA} (see the README)"
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a busy 2-core machine, OpenMP threads spin-waiting for
    each other make small networks many times slower. Restored afterwards for other modules."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_model_store(tmp_path_factory, monkeypatch):
    """User models go to a temporary folder, never to the developer's own store."""
    monkeypatch.setenv("GLAS_SEG_MODEL_DIR", str(tmp_path_factory.mktemp("models")))


@pytest.fixture
def touching_squares() -> np.ndarray:
    """Two touching 20x20 squares (ids 1, 2) and a separate one (id 5) on a 64x64 canvas."""
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[5:25, 5:25] = 1
    labels[5:25, 25:45] = 2
    labels[40:60, 40:60] = 5
    return labels


@pytest.fixture
def docked(make_napari_viewer):
    """Factory: ``docked(WidgetClass)`` -> ``(viewer, widget)`` with the widget docked in a new viewer."""

    def make(widget_class):
        viewer = make_napari_viewer()
        widget = widget_class(viewer)
        viewer.window.add_dock_widget(widget)
        return viewer, widget

    return make


def run_and_wait(qtbot, widget, timeout=60000) -> str:
    """Click Run on a widget with a ``task`` and wait until it ends; returns how it ended."""
    with qtbot.waitSignal(widget.task.finished, timeout=timeout) as blocker:
        widget.run()
    return blocker.args[0]


def disc_sample(name: str, seed: int, size: int, count: int, margin: int, radii: tuple[int, int]):
    """A synthetic H&E-like ``Sample``: pink background with ``count`` purple discs (labels 1..count,
    radius in ``[radii[0], radii[1])``, centres ``margin`` pixels from the border) and light noise."""
    from glas_seg.backend.data import Sample

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for i in range(1, count + 1):
        cy, cx, r = rng.integers(margin, size - margin), rng.integers(margin, size - margin), rng.integers(*radii)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) & (labels == 0)] = i
    image = np.empty((size, size, 3), np.float32)
    image[:] = (0.9, 0.7, 0.8)
    image[labels > 0] = (0.5, 0.3, 0.6)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return Sample(name, np.clip(image, 0, 1), labels)
