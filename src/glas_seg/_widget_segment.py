"""Segment dock widget: image layer + model -> instance Labels layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QObject, QTimer, Signal

from ._background import TaskPanel
from ._dock import dock_as_tab
from ._layers import METADATA_KEY, PROBABILITY, SEGMENTATION, adding_layers, fits, plugin_is_adding
from ._slide_widget import SLIDE_REGIONS, VISIBLE, add_slide_labels, is_slide_layer, slide_job, slide_region
from .backend import model_store
from .backend.inference import segment
from .backend.models import INFERENCE_MODES, INSTANCE_ARCHITECTURES
from .backend.registry import DEFAULT_MODEL, list_models, load_model, model_summary
from .backend.stacks import all_planes, fingerprint, leading_shape

if TYPE_CHECKING:
    import napari


SINGULAR = {"glands": "gland", "nuclei": "nucleus"}


def output_layer_name(image_name: str, task: str = "glands") -> str:
    """``"<image> glands"`` (or ``nuclei``, after the model's task)."""
    return f"{image_name} {task}"


def writable_labels_layer(viewer: "napari.Viewer", name: str) -> Labels | None:
    """The Labels layer called ``name`` if it holds exactly what glas-seg last wrote there.

    A layer the user has painted on (or that glas-seg did not create) is never overwritten.
    """
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    if not isinstance(layer, Labels):
        return None
    written = layer.metadata.get(METADATA_KEY, {}).get("fingerprint")
    return layer if written == fingerprint(layer.data) else None


def unique_layer_name(viewer: "napari.Viewer", name: str) -> str:
    candidate, n = name, 1
    while candidate in viewer.layers:
        n += 1
        candidate = f"{name} [{n}]"
    return candidate


class StoreRelay(QObject):
    """Hands model-store changes (made in any thread) to the GUI thread as a Qt signal."""

    changed = Signal()

    def notify(self, _action: str, _name: str) -> None:
        self.changed.emit()


class SegmentWidget(Container):
    """Segment the chosen image layer into glands with a bundled or user model."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._result: dict | None = None  # the last result: the status line follows its edits
        self.panel = TaskPanel("Segment")
        self.task, self.run_button, self.cancel_button = self.panel.task, self.panel.run_button, self.panel.cancel_button
        self.progress, self.status = self.panel.progress, self.panel.status
        self._store_relay = StoreRelay(self.native)  # dies with the widget's Qt objects
        self._store_relay.changed.connect(self.refresh_models)
        model_store.subscribe(self._store_relay.notify)  # weak: never keeps this widget alive

        self.image = ComboBox(label="Image", choices=self._image_layers, nullable=True)
        self.model = ComboBox(label="Model", choices=self._model_names)
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.export_button = PushButton(text="Export model...",
                                        tooltip="write the selected model as ONNX (onnxruntime) or TorchScript "
                                                "(QuPath, Fiji), with a JSON file of its settings (docs/export.md)")
        self._has_modes = False  # whether the selected model's architecture has inference modes
        self.mode = ComboBox(label="Inference mode", choices=["accurate", "fast"], value="accurate", visible=False,
                             tooltip="U-Net++: accurate averages all heads; fast uses one pruned head")
        self.planes = ComboBox(label="Stack planes", choices=["current plane", "all planes"], value="current plane")
        # Slides (opened by glas-seg's reader) are segmented from disk, region by region (docs/wsi.md).
        self.slide_region = ComboBox(label="Slide region", choices=SLIDE_REGIONS, value=VISIBLE, visible=False,
                                     tooltip="what part of the slide to segment: the field in view, the box around "
                                             "the shapes of a Shapes layer, or the whole slide (tissue only)")
        self.probabilities = CheckBox(text="Add probability layer", value=False)
        self.advanced = CheckBox(text="Advanced options", value=False)
        self.tile_size = SpinBox(label="Tile size", min=64, max=2048, step=32, value=384, visible=False)
        self.overlap = FloatSpinBox(label="Tile overlap", min=0.0, max=0.75, step=0.05, value=0.25, visible=False)
        self.tta = CheckBox(text="Flip test-time augmentation", value=False, visible=False)
        self.mask_glass = CheckBox(text="Blank glass is background", value=True, visible=False,
                                   tooltip="Find blank glass at the image border, show the model mirrored "
                                           "tissue there and keep it background (glands at tissue edges)")
        self.min_size = SpinBox(label="Min object size (px)", min=0, max=100000, step=50, value=400, visible=False)
        self.extend([
            self.image, self.slide_region, self.model, self.mode, self.export_button, self.device, self.planes,
            self.probabilities,
            self.advanced,
            self.tile_size, self.overlap, self.tta, self.mask_glass, self.min_size, *self.panel.widgets,
        ])
        dock_as_tab(self.native)
        self._recount_timer = QTimer(self.native)
        self._recount_timer.setSingleShot(True)
        self._recount_timer.setInterval(250)
        self._recount_timer.timeout.connect(self._update_result_status)
        if DEFAULT_MODEL in self.model.choices:
            self.model.value = DEFAULT_MODEL
        self.model.changed.connect(self._apply_model_defaults)
        self.advanced.changed.connect(self._toggle_advanced)
        self.run_button.changed.connect(self.run)
        self.export_button.changed.connect(lambda _value=None: self.export_model())
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        napari_viewer.layers.selection.events.active.connect(self._follow_active_layer)
        self._apply_model_defaults()
        self._follow_active_layer()
        self.image.changed.connect(self._show_slide_options)
        self._show_slide_options()

    # -- choices ---------------------------------------------------------------------------
    def _image_layers(self, _widget=None) -> list:
        # A probability map glas-seg wrote is an Image layer, but not an image to segment.
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and fits(layer, (PROBABILITY,))]

    def _model_names(self, _widget=None) -> list[str]:
        return [entry.name for entry in list_models()]

    def refresh_models(self, select: str | None = None) -> None:
        """Re-read the model store (called after fine-tuning adds a model)."""
        self.model.reset_choices()
        if select is not None and select in self.model.choices:
            self.model.value = select

    def reset_choices(self, *_args) -> None:
        super().reset_choices()
        if self.image.value is None:
            self._follow_active_layer()
        if self._result is not None and self._result["layer"] not in self.viewer.layers:
            self._update_result_status()

    def _follow_active_layer(self, _event=None) -> None:
        """Select the image layer the user made active, else keep the choice, else take the newest image.

        While glas-seg itself adds layers the active layer is not followed (see :mod:`._layers`).
        """
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and active in self.image.choices and not plugin_is_adding():
            self.image.value = active
        elif self.image.value is None and self._image_layers():
            self.image.value = self._image_layers()[-1]

    def _show_slide_options(self, _value=None) -> None:
        slide = is_slide_layer(self.image.value)
        self.slide_region.visible = slide
        self.planes.enabled = self.probabilities.enabled = not slide

    def _toggle_advanced(self, show: bool) -> None:
        for widget in (self.tile_size, self.overlap, self.tta, self.mask_glass, self.min_size):
            widget.visible = show

    def _apply_model_defaults(self, _value=None) -> None:
        for entry in list_models():
            if entry.name == self.model.value:
                self.model.tooltip = model_summary(entry)  # names its val. object F1 (pooled), as the CLI and docs
                self.tile_size.value = entry.config.tile_size
                self.min_size.value = entry.config.min_size
                modes = INFERENCE_MODES.get(entry.config.architecture)
                self._has_modes = modes is not None
                self.mode.visible = self._has_modes
                if modes:
                    self.mode.choices = list(modes)
                # Flip averaging applies to pixel probabilities, not to detected instances.
                flips_apply = entry.config.architecture not in INSTANCE_ARCHITECTURES
                self.tta.enabled = flips_apply
                if not flips_apply:
                    self.tta.value = False

    # -- running ---------------------------------------------------------------------------
    def run(self) -> None:
        """Validate the inputs, then segment in the background."""
        if self.task.running:
            show_info("glas-seg: a segmentation is already running")
            return
        layer = self.image.value
        if layer is None:
            show_warning("glas-seg: open an image layer to segment (File > Open, or File > Open Sample > glas-seg)")
            return
        if not isinstance(layer, Image):
            show_warning(f"glas-seg: {layer.name!r} is not an image layer; choose an image to segment")
            return
        if not self.model.value:
            show_warning("glas-seg: no model is available")
            return
        if is_slide_layer(layer):  # never loaded whole: segmented from disk in chunks
            self._run_slide(layer)
            return
        data, rgb = layer.data, bool(layer.rgb)
        if isinstance(data, list):  # multiscale: segment the full-resolution level
            data = data[0]
        try:
            stack_shape = leading_shape(data.shape, rgb)
        except ValueError as exc:
            show_warning(f"glas-seg: {exc}")
            return
        if stack_shape and self.planes.value == "current plane":
            step = self.viewer.dims.current_step[: len(stack_shape)]
            planes = [tuple(int(i) for i in step)]
        else:
            planes = all_planes(data.shape, rgb) if stack_shape else [()]
        options = dict(tile_size=self.tile_size.value, overlap=self.overlap.value, tta=self.tta.value,
                       mask_glass=self.mask_glass.value)
        model_name, device, min_size = self.model.value, self.device.value, self.min_size.value
        mode = self.mode.value if self._has_modes else None
        want_probs = self.probabilities.value

        def job(report, cancel):
            model = load_model(model_name, device, mode=mode)
            labels, probs = [], []
            for i, index in enumerate(planes):
                result = segment(
                    model, np.asarray(data[index]), min_size=min_size, cancel=cancel,
                    progress=lambda done, total, i=i: report(i * total + done, len(planes) * total), **options,
                )
                labels.append(result.labels)
                probs.append(result.foreground if want_probs else None)
            return planes, labels, probs, model.config.scale, model.config.task

        self.panel.start(job, lambda out: self._add_layers(layer, stack_shape, *out), f"glas-seg: segmenting {layer.name}",
                         f"Segmenting {layer.name} ({len(planes)} plane{'s' * (len(planes) > 1)})...")

    def export_model(self, path: str | None = None) -> None:
        """Export the selected model in the background (docs/export.md); asks for the file unless
        ``path`` is given. ``.pt`` means TorchScript, ``.zip`` a bioimage.io package (Fiji /
        DeepImageJ), anything else ONNX."""
        if self.task.running:
            show_info("glas-seg: wait until the running task has finished")
            return
        if not self.model.value:
            show_warning("glas-seg: no model is available")
            return
        name, mode = self.model.value, (self.mode.value if self._has_modes else None)
        if path is None:
            from pathlib import Path

            from qtpy.QtWidgets import QFileDialog

            path, chosen = QFileDialog.getSaveFileName(
                self.native, f"Export {name}", f"{name}.onnx",
                "ONNX, for onnxruntime (*.onnx);;TorchScript, for QuPath (*.pt);;"
                "bioimage.io package, for Fiji / DeepImageJ (*.zip)")
            if not path:
                return
            if not Path(path).suffix:  # the filter chosen names the format
                path += ".pt" if chosen.startswith("TorchScript") else ".zip" if chosen.startswith("bioimage") else ".onnx"
        suffix = str(path).lower()
        fmt = "torchscript" if suffix.endswith((".pt", ".pth")) else "bioimageio" if suffix.endswith(".zip") else "onnx"

        def job(report, cancel):
            from .backend.export import export_model, sidecar_path
            from .backend.progress import Cancelled

            written = export_model(name, path, format=fmt, mode=mode)
            if cancel.is_set():  # an export cannot stop half-way; a cancelled one leaves no file
                written.unlink(missing_ok=True)
                sidecar_path(written).unlink(missing_ok=True)
                raise Cancelled()
            return written, sidecar_path(written)

        def done(out) -> None:
            settings = "rdf.yaml and README.md inside" if fmt == "bioimageio" else f"its settings are in {out[1].name}"
            self.status.value = f"Exported {name} ({fmt}) to {out[0]}; {settings}"

        self.panel.start(job, done, f"glas-seg: exporting {name}", f"Exporting {name} as {fmt}...")

    def _run_slide(self, layer: Image) -> None:
        try:
            region = slide_region(self.viewer, layer, self.slide_region.value)
        except ValueError as exc:
            show_warning(f"glas-seg: {exc}")
            return
        options = dict(tile_size=self.tile_size.value, overlap=self.overlap.value, tta=self.tta.value,
                       mask_glass=self.mask_glass.value)
        job = slide_job(layer.metadata["slide_path"], region, self.model.value, self.device.value,
                        self.mode.value if self._has_modes else None, self.min_size.value, options)
        where = "the whole slide" if region is None else f"{region[2]} x {region[3]} px at x={region[0]}, y={region[1]}"
        self.panel.start(job, lambda out: self._add_slide_layer(layer, *out), f"glas-seg: segmenting {layer.name}",
                         f"Segmenting {where} of {layer.name} (tissue only, in chunks)...")

    def _add_slide_layer(self, image_layer: Image, result, task: str) -> None:
        with adding_layers(self.viewer):
            target = add_slide_labels(self.viewer, image_layer, result, task,
                                      unique_layer_name(self.viewer, output_layer_name(image_layer.name, task)),
                                      METADATA_KEY)
        # Not tracked for edits like an in-memory result: counting would read the whole slide.
        self.status.value = (f"{target.name}: {len(result.objects)} {task} in {result.chunks_with_tissue} of "
                             f"{result.chunks} chunks ({result.seconds:.0f} s); labels on disk in {result.store}")

    def _add_layers(self, image_layer: Image, stack_shape, planes, labels, probs, scale, task) -> None:
        plane_shape = labels[0].shape
        if stack_shape and len(planes) > 1:
            full = np.zeros(stack_shape + plane_shape, dtype=np.int32)
            for index, plane in zip(planes, labels):
                full[index] = plane
        elif stack_shape:
            full = np.zeros(stack_shape + plane_shape, dtype=np.int32)
            full[planes[0]] = labels[0]
        else:
            full = labels[0]
        name = output_layer_name(image_layer.name, task)
        meta = {METADATA_KEY: {"role": SEGMENTATION, "fingerprint": fingerprint(full), "model": self.model.value,
                               "image": image_layer.name}}
        target = writable_labels_layer(self.viewer, name)
        # New layers do not take the user's selection, so no widget retargets itself to them.
        with adding_layers(self.viewer):
            if target is not None:
                target.data = full
                target.metadata = meta
            else:
                target = self.viewer.add_labels(
                    full, name=unique_layer_name(self.viewer, name), metadata=meta,
                    scale=image_layer.scale[: full.ndim], translate=image_layer.translate[: full.ndim],
                )
            if probs[0] is not None:
                prob = probs[0] if len(probs) == 1 else np.stack(probs)
                factor = 1 / scale
                self.viewer.add_image(
                    prob, name=unique_layer_name(self.viewer, f"{image_layer.name} {SINGULAR.get(task, task)} probability"),
                    colormap="magma", opacity=0.5, contrast_limits=(0, 1), visible=False,
                    metadata={METADATA_KEY: {"role": PROBABILITY, "image": image_layer.name}},
                    scale=[factor] * prob.ndim if prob.ndim == 2 else [1] * (prob.ndim - 2) + [factor] * 2)
        self._track_result(target, planes[-1] if stack_shape else (), task, len(planes), len(np.unique(labels[-1])) - 1)

    # -- status of the last result -----------------------------------------------------------
    def _track_result(self, layer: Labels, plane: tuple, task: str, n_planes: int, count: int) -> None:
        """Show the object count of ``layer`` and keep it up to date while the user edits the layer."""
        previous = self._result and self._result["layer"]
        if previous is not None and previous is not layer:
            self._watch(previous, False)
        self._result = {"layer": layer, "plane": plane, "task": task, "n_planes": n_planes, "count": count}
        if previous is not layer:
            self._watch(layer, True)
        self._update_result_status()

    def _watch(self, layer: Labels, on: bool) -> None:
        # paint: brush, fill, Edit widget; data: replaced array; set_data: refresh after undo / redo.
        for event in (layer.events.paint, layer.events.data, layer.events.set_data):
            (event.connect if on else event.disconnect)(self._result_edited)

    def _result_edited(self, _event=None) -> None:
        try:
            self._recount_timer.start()  # one recount after a burst of edits
        except RuntimeError:  # the dock was closed: its Qt objects are gone, the layer lives on
            pass

    def _update_result_status(self) -> None:
        result = self._result
        if result is None or self.task.running:
            return
        layer, task = result["layer"], result["task"]
        if layer not in self.viewer.layers:
            self.status.value = f"{layer.name} ({result['count']} {task} when segmented) was removed."
            self._watch(layer, False)
            self._result = None
            return
        count = int(np.count_nonzero(np.unique(np.asarray(layer.data[result["plane"]]))))
        where = f" in the last of {result['n_planes']} planes" if result["n_planes"] > 1 else ""
        edited = f" after edits ({result['count']} when segmented)" if count != result["count"] else ""
        self.status.value = f"{layer.name}: {count} {task}{where}{edited}"
