"""Take the slide screenshot for docs/wsi.md: the real Aperio test slide opened through
glas-seg's reader (scale bar in micrometres), segmented by the Segment widget.

Run under a display or Xvfb:
``xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python tools/screenshot_slide.py docs/images/napari_slide.png``
"""

import sys
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from glas_seg._slide_widget import WHOLE
from glas_seg._widget_segment import SegmentWidget

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def main(out: str) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 860)
    [slide] = viewer.open(str(SLIDE), plugin="glas-seg")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (glas-seg)", area="right")
    widget.image.value = slide
    widget.slide_region.value = WHOLE
    widget.run()
    while widget.task.running:
        QApplication.processEvents()
    layer = viewer.layers[f"{slide.name} glands"]
    layer.contour = 3
    layer.opacity = 0.9
    viewer.scale_bar.visible = True
    viewer.reset_view()
    print(widget.status.value)
    for _ in range(30):
        QApplication.processEvents()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(out, canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/images/napari_slide.png")
