"""Take the README screenshot: napari with the GlaS sample segmented by the default model.

Run under a display or Xvfb: ``xvfb-run -a .venv/bin/python tools/screenshot.py docs/images/napari_segment.png``
"""

import sys
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from glas_seg._widget_segment import SegmentWidget


def main(out: str) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 820)
    viewer.open_sample("glas-seg", "glas")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (glas-seg)", area="right")
    widget.image.value = viewer.layers["glas_train_12"]
    widget.run()
    while widget.task.running:
        QApplication.processEvents()
    layer = viewer.layers["glas_train_12 glands"]
    layer.contour = 2
    layer.opacity = 0.9
    print(f"{len(np.unique(layer.data)) - 1} glands")
    for _ in range(20):
        QApplication.processEvents()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(out, canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/images/napari_segment.png")
