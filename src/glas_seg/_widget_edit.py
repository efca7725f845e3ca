"""Edit labels dock widget: correct gland instances on any Labels layer, with undo.

The operations are the pure functions of :mod:`glas_seg.backend.editing`, applied to the current
plane of the chosen Labels layer. Each edit is written with ``Labels.data_setitem`` as a single
napari history item, so Ctrl+Z on the layer (or the widget's Undo button) restores exactly the
previous array. Other layers are only read (cut lines from a Shapes layer, seeds from Points).

A slide's labels (a lazy layer read from disk) are edited a region at a time: *Edit region* opens
the visible field or a Shapes box as an in-memory Labels layer, *Write back* writes it into the
store (:mod:`._slide_edit`; the row shows only when the viewer holds a segmented slide).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton, SpinBox
from napari.layers import Labels, Points, Shapes
from napari.utils.notifications import show_warning

from ._background import BackgroundTask
from ._dock import dock_as_tab, wrap_text
from ._layers import ERROR_ROLES, METADATA_KEY, adding_layers, fits, plugin_is_adding, role
from ._slide_edit import SLIDE_REGION_EDIT, finish_write_back, open_region, slide_labels_layers, write_back_job
from ._slide_widget import SHAPES, SLIDE_SEGMENTATION, VISIBLE
from .backend import editing
from .backend.errors import GlasSegError

if TYPE_CHECKING:
    import napari

# (key, what it does, EditWidget method): viewer-level bindings; none clashes with napari's
# defaults for the viewer or the Labels, Points and Shapes layers.
KEY_BINDINGS: tuple[tuple[str, str, str], ...] = (
    ("Shift-D", "Delete the object under the cursor", "delete_under_cursor"),
    ("Shift-S", "Add / remove the object under the cursor to the selection", "toggle_under_cursor"),
    ("Shift-M", "Merge the selection with the object under the cursor", "merge_under_cursor"),
    ("Shift-K", "Split along the cut line (selected or last shape)", "split_along_line"),
    ("Shift-W", "Split by seeds (watershed from the points)", "split_by_seeds"),
    ("Shift-H", "Fill the holes of the object under the cursor", "fill_holes_under_cursor"),
    ("Shift-O", "Smooth the outline of the object under the cursor", "smooth_under_cursor"),
    ("Shift-N", "Paint with the next free id", "select_next_free_id"),
)
CLOSED_SHAPES = ("polygon", "rectangle")
OPEN_SHAPES = ("line", "path")


def parse_ids(text: str) -> list[int]:
    """``"12, 40 7"`` -> ``[12, 40, 7]`` (distinct, in order); ValueError on anything else."""
    tokens = [t for t in re.split(r"[\s,;]+", text.strip()) if t]
    bad = [t for t in tokens if not t.isdigit()]
    if bad:
        raise ValueError(f"Selected ids must be positive whole numbers separated by commas, not {bad[0]!r}")
    return list(dict.fromkeys(int(t) for t in tokens if int(t) > 0))


def apply_plane_edit(layer: Labels, plane: tuple[int, ...], new: np.ndarray) -> int:
    """Write ``new`` into one plane of ``layer`` as one undoable history item.

    Parameters
    ----------
    layer : napari Labels layer
    plane : tuple of int
        Index of the plane in the leading (stack) axes; ``()`` for a 2D layer.
    new : ndarray, shape ``layer.data.shape[-2:]``
        The edited plane.

    Returns
    -------
    int
        Number of pixels changed (0: nothing written, no history item).
    """
    old = np.asarray(layer.data[plane])
    rows, cols = np.nonzero(new != old)
    if rows.size == 0:
        return 0
    indices = tuple(np.full(rows.size, i, dtype=np.intp) for i in plane) + (rows, cols)
    layer.data_setitem(indices, new[rows, cols])
    return int(rows.size)


def _row(label: str, *widgets) -> Container:
    row = Container(widgets=list(widgets), layout="horizontal", labels=False, label=label)
    row.margins = (0, 0, 0, 0)
    return row


class EditWidget(Container):
    """Delete, merge, split, fill, clean, smooth and relabel objects of a Labels layer."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer

        self.labels = ComboBox(label="Labels", choices=self._labels_layers, nullable=True)
        self.selection = LineEdit(label="Selected ids", value="")
        self.selection.tooltip = "Ids separated by commas; Shift-S adds or removes the object under the cursor"
        self.delete_button = PushButton(text="Delete selected")
        self.merge_button = PushButton(text="Merge selected")
        self.cut_lines = ComboBox(label="Cut lines", choices=self._shapes_layers, nullable=True)
        self.new_cut_layer = PushButton(text="New")
        self.split_line_button = PushButton(text="Split along line")
        self.seeds = ComboBox(label="Seeds", choices=self._points_layers, nullable=True)
        self.new_seed_layer = PushButton(text="New")
        self.split_seeds_button = PushButton(text="Split by seeds")
        self.fill_button = PushButton(text="Fill holes")
        self.min_size = SpinBox(label="Min size (px)", min=0, max=10_000_000, step=50, value=200)
        self.remove_button = PushButton(text="Remove small objects")
        self.radius = SpinBox(label="Smooth radius (px)", min=1, max=50, value=3)
        self.smooth_button = PushButton(text="Smooth outlines")
        self.relabel_button = PushButton(text="Relabel 1..N")
        self.next_id_button = PushButton(text="Next free id")
        self.undo_button = PushButton(text="Undo last edit (Ctrl+Z)")
        self.slide_region = ComboBox(label="Slide region", choices=[VISIBLE, SHAPES], value=VISIBLE,
                                     tooltip="the part of a segmented slide's labels that Edit region opens")
        self.edit_region_button = PushButton(text="Edit region",
                                             tooltip="open this region of the slide's labels as an editable layer")
        self.write_back_button = PushButton(text="Write back",
                                            tooltip="write the edited region layer into the slide's label store")
        self.slide_row = _row("Slide region", self.slide_region, self.edit_region_button, self.write_back_button)
        self.keys = Label(label="Keys", value=self.key_help())
        self.status = Label(value="")
        wrap_text(self.status)
        self.extend([
            self.labels, self.slide_row, self.selection, _row("", self.delete_button, self.merge_button),
            _row("Cut lines", self.cut_lines, self.new_cut_layer), self.split_line_button,
            _row("Seeds", self.seeds, self.new_seed_layer), self.split_seeds_button,
            self.fill_button, self.min_size, self.remove_button, self.radius, self.smooth_button,
            _row("", self.relabel_button, self.next_id_button), self.undo_button, self.status, self.keys,
        ])
        dock_as_tab(self.native)
        self.fill_button.tooltip = self.smooth_button.tooltip = "Acts on the selected ids, or on all objects when none is selected"

        self.delete_button.changed.connect(self.delete_selected)
        self.merge_button.changed.connect(self.merge_selected)
        self.split_line_button.changed.connect(self.split_along_line)
        self.split_seeds_button.changed.connect(self.split_by_seeds)
        self.new_cut_layer.changed.connect(self.add_cut_line_layer)
        self.new_seed_layer.changed.connect(self.add_seed_layer)
        self.fill_button.changed.connect(self.fill_holes)
        self.remove_button.changed.connect(self.remove_small)
        self.smooth_button.changed.connect(self.smooth)
        self.relabel_button.changed.connect(self.relabel)
        self.next_id_button.changed.connect(self.select_next_free_id)
        self.undo_button.changed.connect(self.undo)
        self.edit_region_button.changed.connect(self.edit_region)
        self.write_back_button.changed.connect(self.write_back)
        self.write_task = BackgroundTask()
        # The region layer being written back, whether it was editable and its mode (restored after).
        self._writing: tuple = (None, True, None)
        self.write_task.finished.connect(self._write_finished)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        napari_viewer.layers.selection.events.active.connect(self._follow_active_layer)
        self._follow_active_layer()
        self.reset_choices()
        self._bound: dict[str, Callable] = {}
        self.bind_keys()
        self.native.destroyed.connect(self.unbind_keys)

    # -- key bindings ----------------------------------------------------------------------------
    @staticmethod
    def key_help() -> str:
        return "\n".join(f"{key}: {text}" for key, text, _ in KEY_BINDINGS)

    def bind_keys(self) -> None:
        """Bind :data:`KEY_BINDINGS` on the viewer (they act on the chosen Labels layer)."""
        for key, _, method in KEY_BINDINGS:
            action = getattr(self, method)

            def callback(_viewer, action=action):
                action()

            self.viewer.bind_key(key, callback, overwrite=True)
            self._bound[key] = callback

    def unbind_keys(self, *_args) -> None:
        """Remove this widget's key bindings (those another widget has not replaced since)."""
        from napari.utils.key_bindings import coerce_keybinding

        for key, callback in self._bound.items():
            combo = coerce_keybinding(key)
            if self.viewer.keymap.get(combo) is callback:
                del self.viewer.keymap[combo]
        self._bound = {}

    # -- choices -------------------------------------------------------------------------------
    def _labels_layers(self, _widget=None) -> list:
        # Metrics' false positive / negative layers are results to look at, not labels to correct.
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels) and fits(layer, ERROR_ROLES)]

    def _shapes_layers(self, _widget=None) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Shapes)]

    def _points_layers(self, _widget=None) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Points)]

    def _follow_active_layer(self, _event=None) -> None:
        """Take the layer the user made active (never one glas-seg is adding, see :mod:`._layers`)."""
        active = self.viewer.layers.selection.active
        if plugin_is_adding():
            return
        for combo in (self.labels, self.cut_lines, self.seeds):
            if active is not None and active in combo.choices:
                combo.value = active

    def reset_choices(self, *_args) -> None:
        """Re-read the layers; an empty Labels box takes the newest Labels layer that fits."""
        super().reset_choices()
        if self.labels.value is None:
            layers = self._labels_layers()
            if layers:
                self.labels.value = layers[-1]
        self.slide_row.visible = any(role(layer) in (SLIDE_SEGMENTATION, SLIDE_REGION_EDIT) for layer in self.viewer.layers)

    # -- helpers -----------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        self.status.value = message
        show_warning(f"glas-seg: {message}")

    def _target(self) -> tuple[Labels, tuple[int, ...]] | None:
        """The chosen Labels layer and the index of its current plane, or None (after a warning)."""
        layer = self.labels.value
        if not isinstance(layer, Labels):
            self._fail("choose a Labels layer to edit (or create one: Layers > New Labels Layer)")
            return None
        if not layer.visible:  # a key press would change objects nobody can see
            self._fail(f"{layer.name!r} is hidden; show it (eye icon in the layer list) or choose another Labels layer")
            return None
        if layer.multiscale:
            self._fail(f"{layer.name!r} is multiscale; edit a single-resolution Labels layer")
            return None
        if layer is self._writing[0]:
            self._fail(f"{layer.name!r} is being written back to its slide; edit it when that has finished")
            return None
        if layer.ndim < 2:
            self._fail(f"{layer.name!r} has no 2D plane")
            return None
        dims = self.viewer.dims
        if dims.ndisplay != 2 or sorted(dims.displayed) != [dims.ndim - 2, dims.ndim - 1]:
            self._fail("edit in the 2D view of the last two axes (rows, columns)")
            return None
        if layer.ndim == 2:
            return layer, ()
        point = layer.world_to_data(np.asarray(dims.point))
        plane = tuple(int(round(v)) for v in point[: layer.ndim - 2])
        if any(not 0 <= i < n for i, n in zip(plane, layer.data.shape)):
            self._fail(f"the current plane {plane} is outside {layer.name!r}")
            return None
        return layer, plane

    def _to_pixels(self, source, coords: np.ndarray, layer: Labels) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of ``source`` layer's data -> (plane index per point, (row, col) per point)
        in ``layer``'s data; a 2D source lies on the current plane."""
        out = []
        for vertex in np.asarray(coords, dtype=float):
            world = np.asarray(self.viewer.dims.point, dtype=float).copy()
            mapped = np.asarray(source.data_to_world(vertex), dtype=float)
            world[len(world) - len(mapped):] = mapped
            out.append(layer.world_to_data(world))
        out = np.asarray(out, dtype=float).reshape(-1, layer.ndim)
        return np.rint(out[:, :-2]).astype(int), out[:, -2:]

    def _cursor_pixel(self, layer: Labels) -> tuple[int, int] | None:
        position = np.asarray(self.viewer.cursor.position, dtype=float)
        r, c = np.rint(layer.world_to_data(position)[-2:]).astype(int)
        rows, cols = layer.data.shape[-2:]
        return (int(r), int(c)) if 0 <= r < rows and 0 <= c < cols else None

    def _id_under_cursor(self, layer: Labels, plane: tuple[int, ...]) -> int | None:
        pixel = self._cursor_pixel(layer)
        value = 0 if pixel is None else int(layer.data[plane + pixel])
        if value == 0:
            self._fail("no object under the cursor")
            return None
        return value

    def selected_ids(self) -> list[int] | None:
        try:
            return parse_ids(self.selection.value)
        except ValueError as exc:
            self._fail(str(exc))
            return None

    def _set_selection(self, ids: list[int]) -> None:
        self.selection.value = ", ".join(str(i) for i in ids)

    def _edit(self, operation: Callable[[np.ndarray], np.ndarray], done: str, target=None) -> bool:
        """Run ``operation`` on the current plane and write the result as one undo step."""
        target = target or self._target()
        if target is None:
            return False
        layer, plane = target
        try:
            new = operation(np.asarray(layer.data[plane]))
        except ValueError as exc:
            self._fail(str(exc))
            return False
        try:
            changed = apply_plane_edit(layer, plane, new)
        except (TypeError, ValueError, NotImplementedError) as exc:  # read-only or lazy (dask/zarr) layer data
            self._fail(f"could not write to {layer.name!r}: {exc}")
            return False
        self.status.value = f"{done} ({changed} px changed)" if changed else f"{done}: nothing changed"
        return True

    def _first_new_id(self, layer: Labels) -> int | None:
        """Ids above the whole layer's maximum, so a split never reuses an id of another plane."""
        try:
            return editing.next_free_id(np.asarray(layer.data))
        except ValueError:
            return None  # the dtype is full above: the backend looks for gaps in the plane

    # -- operations ------------------------------------------------------------------------------
    def delete_selected(self) -> None:
        ids = self.selected_ids()
        if ids is None:
            return
        if not ids:
            self._fail("select ids to delete (type them, or Shift-S over objects)")
            return
        if self._edit(lambda a: editing.delete_labels(a, ids), f"Deleted {ids}"):
            self._set_selection([])

    def delete_under_cursor(self) -> None:
        target = self._target()
        index = target and self._id_under_cursor(*target)
        if index:
            self._edit(lambda a: editing.delete_labels(a, [index]), f"Deleted {index}", target)

    def toggle_under_cursor(self) -> None:
        target = self._target()
        index = target and self._id_under_cursor(*target)
        ids = self.selected_ids()
        if not index or ids is None:
            return
        ids = [i for i in ids if i != index] if index in ids else ids + [index]
        self._set_selection(ids)
        self.status.value = f"Selected ids: {ids}"

    def merge_selected(self) -> None:
        ids = self.selected_ids()
        if ids is not None and self._edit(lambda a: editing.merge_labels(a, ids), f"Merged {ids} into {ids[0] if ids else None}"):
            self._set_selection([])

    def merge_under_cursor(self) -> None:
        target = self._target()
        index = target and self._id_under_cursor(*target)
        ids = self.selected_ids()
        if not index or ids is None:
            return
        ids = ids + [index] if index not in ids else ids
        if self._edit(lambda a: editing.merge_labels(a, ids), f"Merged {ids} into {ids[0]}", target):
            self._set_selection([])

    def split_along_line(self) -> None:
        target = self._target()
        shapes = self.cut_lines.value
        if target is None:
            return
        if not isinstance(shapes, Shapes) or len(shapes.data) == 0:
            self._fail("draw a cut line in a Shapes layer (New, then a path or line) and choose it as Cut lines")
            return
        layer, plane = target
        chosen = sorted(shapes.selected_data) or list(range(len(shapes.data)))
        for i in reversed(chosen):
            planes, path = self._to_pixels(shapes, shapes.data[i], layer)
            if len(path) and (planes == np.asarray(plane, dtype=int)).all():
                break
        else:
            self._fail(f"{shapes.name!r} has no shape on the current plane")
            return
        kind = str(shapes.shape_type[i])
        if kind not in OPEN_SHAPES + CLOSED_SHAPES:
            self._fail(f"cut along a line, path, polygon or rectangle, not a {kind}")
            return
        start = self._first_new_id(layer)
        self._edit(
            lambda a: editing.split_along_line(a, path, closed=kind in CLOSED_SHAPES, start_id=start),
            f"Split along {shapes.name}", target,
        )

    def split_by_seeds(self) -> None:
        target = self._target()
        points = self.seeds.value
        if target is None:
            return
        if not isinstance(points, Points) or len(points.data) == 0:
            self._fail("click seed points in a Points layer (New, then two or more per object) and choose it as Seeds")
            return
        layer, plane = target
        chosen = sorted(points.selected_data) or list(range(len(points.data)))
        planes, pixels = self._to_pixels(points, points.data[chosen], layer)
        on_plane = (planes == np.asarray(plane, dtype=int)).all(axis=1)
        start = self._first_new_id(layer)
        self._edit(lambda a: editing.split_by_seeds(a, pixels[on_plane], start_id=start), f"Split by {points.name}", target)

    def fill_holes(self) -> None:
        ids = self.selected_ids()
        if ids is not None:
            self._edit(lambda a: editing.fill_holes(a, ids or None), f"Filled holes of {ids or 'all objects'}")

    def fill_holes_under_cursor(self) -> None:
        target = self._target()
        index = target and self._id_under_cursor(*target)
        if index:
            self._edit(lambda a: editing.fill_holes(a, [index]), f"Filled holes of {index}", target)

    def remove_small(self) -> None:
        size = self.min_size.value
        self._edit(lambda a: editing.remove_small(a, size), f"Removed objects under {size} px")

    def smooth(self) -> None:
        ids, radius = self.selected_ids(), self.radius.value
        if ids is not None:
            self._edit(lambda a: editing.smooth_labels(a, radius, ids or None), f"Smoothed {ids or 'all objects'}")

    def smooth_under_cursor(self) -> None:
        target = self._target()
        index = target and self._id_under_cursor(*target)
        radius = self.radius.value
        if index:
            self._edit(lambda a: editing.smooth_labels(a, radius, [index]), f"Smoothed {index}", target)

    def relabel(self) -> None:
        if self._edit(editing.relabel_sequentially, "Relabelled 1..N"):
            self._set_selection([])

    def select_next_free_id(self) -> None:
        layer = self.labels.value
        if not isinstance(layer, Labels) or layer.multiscale:
            self._fail("choose a single-resolution Labels layer")
            return
        try:
            layer.selected_label = editing.next_free_id(np.asarray(layer.data))
        except ValueError as exc:
            self._fail(str(exc))
            return
        self.status.value = f"Painting with the next free id {layer.selected_label}"

    def undo(self) -> None:
        layer = self.labels.value
        if not isinstance(layer, Labels):
            self._fail("choose a Labels layer")
            return
        if layer is self._writing[0]:
            self._fail(f"{layer.name!r} is being written back to its slide; undo when that has finished")
            return
        if not getattr(layer, "_undo_history", True):  # napari's Labels history (private)
            self.status.value = "Nothing to undo"
            return
        layer.undo()
        self.status.value = f"Undid the last edit of {layer.name}"

    # -- slides: a region at a time ----------------------------------------------------------------
    def edit_region(self) -> Labels | None:
        """Open the chosen region of a slide's labels (the chosen Labels if they are a slide's, else the
        selected or topmost slide labels) as an in-memory Labels layer, and choose it for editing."""
        slides = slide_labels_layers(self.viewer)
        chosen = self.labels.value
        source = chosen if chosen in slides else next((s for s in reversed(slides) if s in self.viewer.layers.selection),
                                                      slides[-1] if slides else None)
        if source is None:
            self._fail("segment a slide first (Segment widget, with a slide layer): Edit region opens part of its labels")
            return None
        try:
            with adding_layers(self.viewer):
                layer = open_region(self.viewer, source, self.slide_region.value)
        except GlasSegError as exc:
            self._fail(str(exc))
            return None
        self.labels.value = layer
        y0, y1, x0, x1 = layer.metadata[METADATA_KEY]["box"]
        self.status.value = (f"Opened {x1 - x0} x {y1 - y0} px of {source.name} as {layer.name!r}: select it to "
                             "paint, edit, then Write back")
        return layer

    def write_back(self) -> None:
        """Write the chosen region layer (or the only one) into its slide's label store, in a worker
        thread; the layer cannot be painted until the write has finished."""
        regions = [layer for layer in self.viewer.layers if role(layer) == SLIDE_REGION_EDIT]
        layer = self.labels.value if self.labels.value in regions else regions[0] if len(regions) == 1 else None
        if layer is None:
            self._fail("choose the slide region layer to write back in Labels (Edit region makes one)"
                       if regions else "open a slide region with Edit region first")
            return
        if self.write_task.running:
            self._fail("a write-back is still under way; wait for it to finish")
            return
        try:
            job = write_back_job(layer)
        except GlasSegError as exc:
            self._fail(str(exc))
            return
        self._writing, layer.editable = (layer, layer.editable, layer.mode), False
        self.write_back_button.enabled = False
        self.status.value = f"Writing {layer.name} back..."
        self.write_task.start(lambda report, cancel: job(), lambda out: self._written(layer, *out),
                              f"glas-seg: writing {layer.name} back")

    def _written(self, layer: Labels, result, digest: str) -> None:
        done = finish_write_back(self.viewer, layer, result, digest)
        if not result.changed:
            self.status.value = f"{layer.name}: nothing to write, the store already holds these labels"
            return
        renamed = f"; new ids renumbered {result.renamed}" if result.renamed else ""
        self.status.value = (f"Wrote {layer.name} back: {result.changed} px changed{renamed}"
                             + (f"; {', '.join(s.name for s in done.refreshed)} refreshed" if done.refreshed else ""))

    def _write_finished(self, status: str) -> None:
        layer, editable, mode = self._writing
        self._writing = (None, True, None)
        if layer is not None:
            layer.editable = editable
            if editable:
                layer.mode = mode  # napari switched it to pan/zoom when editing was turned off
        self.write_back_button.enabled = True
        if status == "failed":  # the store is as it was (slide_edit writes all or nothing)
            self.status.value = f"Nothing written: {self.write_task.last_error}"

    def add_cut_line_layer(self) -> None:
        layer = self.labels.value
        kwargs = {} if not isinstance(layer, Labels) else dict(ndim=layer.ndim, scale=layer.scale, translate=layer.translate)
        shapes = self.viewer.add_shapes(name="cut lines", edge_color="yellow", edge_width=2, **kwargs)
        shapes.mode = "add_path"
        self.cut_lines.value = shapes

    def add_seed_layer(self) -> None:
        layer = self.labels.value
        kwargs = {} if not isinstance(layer, Labels) else dict(ndim=layer.ndim, scale=layer.scale, translate=layer.translate)
        points = self.viewer.add_points(name="seeds", face_color="cyan", size=8, **kwargs)
        points.mode = "add"
        self.seeds.value = points
