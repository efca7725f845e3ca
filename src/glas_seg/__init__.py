"""glas-seg: gland and nucleus instance segmentation for H&E histopathology.

The Python API is flat, as in scikit-image::

    import glas_seg

    image = glas_seg.read_image("slide.png")
    result = glas_seg.segment(image, "unet-glands")   # result.labels: int32 (H, W) instance ids

``segment``, ``load_model``, ``list_models``, ``evaluate`` and ``finetune`` are documented in
their docstrings and in docs/api.md; long-running functions share one progress / cancel
contract (``progress(done, total)``, ``cancel`` an Event or callable, :class:`Cancelled`),
docs/progress.md. ``import glas_seg`` is cheap: torch is imported by the first function that
needs it.
"""

from __future__ import annotations

import importlib

from .backend.errors import GlasSegError
from .backend.progress import Cancelled

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (PEP 562), so that importing the
# package (napari does, to read its manifest) loads neither torch nor scikit-image.
_LAZY = {
    "segment": "glas_seg.backend.api",
    "load_model": "glas_seg.backend.api",
    "list_models": "glas_seg.backend.api",
    "evaluate": "glas_seg.backend.api",
    "finetune": "glas_seg.backend.api",
    "export_model": "glas_seg.backend.export",
    "segment_slide": "glas_seg.backend.slide_segment",
    "open_slide": "glas_seg.backend.slide",
    "read_image": "glas_seg.backend.image_io",
    "read_labels": "glas_seg.backend.image_io",
}

__all__ = ["segment", "load_model", "list_models", "evaluate", "finetune", "export_model", "read_image", "read_labels",
           "segment_slide", "open_slide", "GlasSegError", "Cancelled", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module 'glas_seg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
