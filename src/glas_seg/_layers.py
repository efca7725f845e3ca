"""The layers glas-seg writes, and how the dock widgets keep their hands off them.

Every layer a widget adds carries ``layer.metadata["glas_seg"]["role"]``:

- ``"segmentation"``: a Segment result, a Labels layer meant to be edited, scored and trained on;
- ``"probability"``: a Segment probability map (an Image layer, but not an image to segment);
- ``"false positives"`` / ``"false negatives"``: Metrics' error layers (results, never inputs).
- ``"slide segmentation"``: a slide's labels, lazy from an on-disk store (:mod:`._slide_widget`;
  never edited in place, Edit opens a region of it instead);
- ``"slide region edit"``: one region of those labels in memory, to edit and write back (:mod:`._slide_edit`).

Two rules follow (issue 14, "silent wrong input"):

1. A widget offers a layer only where its role fits (:func:`fits`): Segment never offers a
   probability map as the image, Edit and Fine-tune never offer error layers as labels.
2. Adding a layer never moves the user's selection (:func:`adding_layers`), and while glas-seg adds
   layers no widget follows the active layer (:func:`plugin_is_adding`). Widgets follow only what
   the user selects, so their choices never jump to a layer the plugin itself has just added.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari

METADATA_KEY = "glas_seg"
SEGMENTATION = "segmentation"
PROBABILITY = "probability"
FALSE_POSITIVES = "false positives"
FALSE_NEGATIVES = "false negatives"
ERROR_ROLES = (FALSE_POSITIVES, FALSE_NEGATIVES)

_adding = 0  # > 0 while glas-seg adds layers (GUI thread only)


def role(layer) -> str | None:
    """The glas-seg role of ``layer`` (see the module docstring), or None for the user's own layers."""
    meta = getattr(layer, "metadata", None) or {}
    entry = meta.get(METADATA_KEY)
    return entry.get("role") if isinstance(entry, dict) else None


def fits(layer, excluded_roles: tuple[str, ...]) -> bool:
    """Whether ``layer`` may be offered as an input whose unfitting roles are ``excluded_roles``."""
    return role(layer) not in excluded_roles


def plugin_is_adding() -> bool:
    """True while a glas-seg widget is adding layers: widgets must not follow the active layer then."""
    return _adding > 0


@contextmanager
def adding_layers(viewer: "napari.Viewer") -> Iterator[None]:
    """Add layers inside this block without changing which layers the user has selected.

    napari makes every new layer the active one; the selection is put back as it was before the
    block ends, and the widgets ignore the intermediate changes (:func:`plugin_is_adding`).
    """
    global _adding
    selection = viewer.layers.selection
    before = list(selection)
    _adding += 1
    try:
        yield
    finally:
        try:
            keep = [layer for layer in before if layer in viewer.layers]
            selection.intersection_update(keep)
            selection.update(keep)
        finally:
            _adding -= 1
