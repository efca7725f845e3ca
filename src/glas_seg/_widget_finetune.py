"""Fine-tune dock widget: corrected Labels layers -> a new model in the user model store.

The widget copies the chosen layers when Fine-tune is clicked, so the user can keep editing
while training runs and nothing they drew is ever changed. Training runs in the background
(:class:`._background.TaskPanel`) with a live loss / validation curve; the new model is
added to the store, selected in the Segment widget, and one click segments with it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox, ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton, SpinBox,
)
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QObject, Signal

from ._background import TaskPanel, format_duration
from ._dock import dock_as_tab, raise_tab, style_figure
from ._layers import ERROR_ROLES, PROBABILITY, fits
from .backend import model_store
from .backend.finetune import (FinetuneSettings, finetune, format_before_after, format_thresholds,
                                samples_from_arrays)
from .backend.registry import DEFAULT_MODEL, list_models
from .backend.settings import FINETUNE_LAYER_CHOICES

if TYPE_CHECKING:
    import napari

SEGMENT_WIDGET = ("glas-seg", "Segment")
_FT = FinetuneSettings()  # the defaults, written once in backend/settings.py
REGION_TYPES = ("rectangle", "polygon", "ellipse")


class _Relay(QObject):
    """Carries calls from worker threads (training progress, store changes) to the GUI thread."""

    event = Signal(object)
    store_changed = Signal()

    def on_store_change(self, _action: str, _name: str) -> None:
        self.store_changed.emit()


class PairRow(Container):
    """One (image layer, corrected Labels layer) pair."""

    def __init__(self, image_choices, labels_choices) -> None:
        image = ComboBox(label="Image", choices=image_choices, nullable=True)
        labels = ComboBox(label="Labels", choices=labels_choices, nullable=True)
        remove = PushButton(text="-", tooltip="Remove this pair")
        remove.native.setMaximumWidth(28)
        super().__init__(layout="horizontal", labels=False, widgets=[image, labels, remove])
        self.margins = (0, 0, 0, 0)
        self.image_layer, self.labels_layer, self.remove_button = image, labels, remove


def shape_regions(shapes: Shapes, labels: Labels) -> list[np.ndarray]:
    """Rectangles, polygons and ellipses of a Shapes layer as polygons in ``labels``' pixels.

    Vertices go through world coordinates, so layers with different scale or translation line
    up as they do on screen. A 2D Shapes layer over a stack marks the same region on every plane.

    Raises
    ------
    ValueError
        No usable shape, or dimensions that cannot be matched.
    """
    regions = []
    stack_ndim = labels.ndim - 2
    for vertices, kind in zip(shapes.data, shapes.shape_type):
        if kind not in REGION_TYPES:
            continue
        vertices = np.asarray(vertices, dtype=float)
        if kind == "ellipse":  # napari stores the 4 corners of the ellipse's bounding box
            centre, radii = vertices.mean(axis=0), (vertices.max(axis=0) - vertices.min(axis=0)) / 2
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            ring = np.repeat(centre[None], t.size, axis=0)
            ring[:, -2] += radii[-2] * np.sin(t)
            ring[:, -1] += radii[-1] * np.cos(t)
            vertices = ring
        world = np.array([shapes.data_to_world(v) for v in vertices])
        if shapes.ndim == labels.ndim:
            regions.append(np.array([labels.world_to_data(w) for w in world], dtype=float))
        elif shapes.ndim == 2:
            plane = (world - np.asarray(labels.translate[-2:])) / np.asarray(labels.scale[-2:])
            for index in np.ndindex(*labels.data.shape[:stack_ndim]) if stack_ndim else [()]:
                regions.append(np.hstack([np.tile(np.array(index, dtype=float), (len(plane), 1)), plane]))
        else:
            raise ValueError(f"Shapes layer {shapes.name!r} is {shapes.ndim}-D but labels {labels.name!r} are {labels.ndim}-D")
    if not regions:
        raise ValueError(f"Shapes layer {shapes.name!r} has no rectangle, polygon or ellipse to limit training to")
    return regions


def _check_pair_layers(image, labels) -> None:
    """ValueError for a pair that cannot be read whole, checked before anything is copied.

    A multi-resolution layer is a whole slide (the plugin's reader, the slide widget's labels):
    copying its full-resolution level would freeze the viewer and may not fit in memory.
    """
    for layer in (image, labels):
        if getattr(layer, "multiscale", False):
            raise ValueError(f"{layer.name!r} is a whole-slide (multi-resolution) layer: fine-tuning reads single "
                             "images; save the corrected region as its own image and Labels layers and pick those")
    plane = tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
    if tuple(labels.data.shape) != plane:
        raise ValueError(f"{labels.name!r} ({'x'.join(map(str, labels.data.shape))}) does not have the size of "
                         f"{image.name!r} ({'x'.join(map(str, plane))})")


def _plane_data(layer) -> np.ndarray:
    return np.array(layer.data, copy=True)  # a snapshot: the user may keep editing while training runs


class FinetuneWidget(Container):
    """Fine-tune a model on images whose labels the user corrected."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.panel = TaskPanel("Fine-tune", "Cancelled: no model was saved and the base model is unchanged.",
                               show_time_left=False)  # its own timing line counts iterations
        self.task, self.run_button, self.cancel_button = self.panel.task, self.panel.run_button, self.panel.cancel_button
        self.progress, self.status = self.panel.progress, self.panel.status
        self.relay = _Relay(self.native)  # dies with the widget's Qt objects
        self.task.finished.connect(self._on_finished)
        self.relay.event.connect(self._on_event)
        self.relay.store_changed.connect(self._refresh_base_models)
        self._unsubscribe = model_store.subscribe(self.relay.on_store_change)
        self.last_result = None
        self.history: list[dict] = []
        self._rate_start: tuple[int, float] | None = None  # (iteration, elapsed) the rate is measured from
        self._last_draw = 0.0

        self.base = ComboBox(label="Base model", choices=self._model_names)
        if DEFAULT_MODEL in self.base.choices:
            self.base.value = DEFAULT_MODEL
        self.pairs = Container(labels=False, widgets=[], label="Image / Labels")
        self.pairs.margins = (0, 0, 0, 0)
        self.add_pair_button = PushButton(text="Add image / labels pair")
        self.regions = ComboBox(label="Regions (Shapes)", choices=self._shapes_layers, nullable=True,
                                tooltip="Rectangles or polygons around the corrected areas; empty: whole images")
        self.iterations = SpinBox(label="Iterations", min=1, max=100000, step=50, value=_FT.iterations)
        self.learning_rate = FloatSpinBox(label="Learning rate", min=0.0, max=0.1, step=1e-5,
                                          value=_FT.learning_rate or 0.0,
                                          tooltip="auto: 3e-4 when only the head trains, 3e-5 otherwise")
        self.learning_rate.native.setDecimals(6)
        self.learning_rate.native.setSpecialValueText("auto")  # shown at 0, which means None
        self.augment = CheckBox(text="Augmentation", value=_FT.augment)
        self.val_share = FloatSpinBox(label="Validation share", min=0.0, max=0.9, step=0.05, value=_FT.val_fraction,
                                      tooltip="Share of the images held out to measure the model (needs 2+ images); "
                                              "the best-scoring checkpoint is kept")
        self.calibrate = ComboBox(label="Thresholds from corrections", choices=["auto", "on", "off"], value="auto",
                                  tooltip="After training, pick the watershed's seed and foreground thresholds "
                                          "that segment your corrected images best (seconds; no forgetting). "
                                          "auto: only with layers 'none' (docs/finetuning.md)")
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.new_name = LineEdit(label="New model name", value="")
        self.advanced = CheckBox(text="Advanced options", value=False)
        self.layers = ComboBox(label="Layers to train", choices=list(FINETUNE_LAYER_CHOICES), value=_FT.layers,
                               visible=False, tooltip="all; decoder: all but the encoder; head: the output layer(s) "
                                                      "only; auto: all with 100+ corrected objects, else head; "
                                                      "none: thresholds only (with calibration)")
        self.l2sp = FloatSpinBox(label="Pull to base (L2-SP)", min=0.0, max=10000.0, step=10.0, value=_FT.l2sp,
                                 visible=False, tooltip="Weight decay towards the base model's weights; 0: off")
        self.augment_strength = FloatSpinBox(label="Augmentation strength", min=0.0, max=2.0, step=0.25,
                                             value=_FT.augment_strength, visible=False)
        self.patience = SpinBox(label="Early-stop patience", min=0, max=1000, value=_FT.patience, visible=False,
                                tooltip="With a validation share: stop after this many scorings without a better "
                                        "object F1 (0: never)")
        self.freeze_norm = CheckBox(text="Keep batch-norm statistics", value=_FT.freeze_norm, visible=False)
        self.timing = Label(value="")
        self.segment_button = PushButton(text="Segment current image with the new model", enabled=False)
        self.extend([
            self.base, self.pairs, self.add_pair_button, self.regions, self.iterations, self.learning_rate,
            self.augment, self.val_share, self.calibrate, self.device, self.new_name, self.advanced,
            *self._advanced_widgets,
            *self.panel.widgets, self.timing, self.segment_button,
        ])
        self._build_plot()
        dock_as_tab(self.native)
        self.add_pair()
        self.new_name.value = self.suggest_name()

        self.add_pair_button.changed.connect(self.add_pair)
        self.advanced.changed.connect(self._toggle_advanced)
        self.base.changed.connect(lambda _v: setattr(self.new_name, "value", self.suggest_name()))
        self.run_button.changed.connect(self.run)
        self.segment_button.changed.connect(self.segment_with_new_model)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        napari_viewer.events.theme.connect(self._draw_curves)

    # -- layout pieces ----------------------------------------------------------------------
    @property
    def _advanced_widgets(self) -> tuple:
        return (self.layers, self.l2sp, self.augment_strength, self.patience, self.freeze_norm)

    def _toggle_advanced(self, show: bool) -> None:
        for widget in self._advanced_widgets:
            widget.visible = show

    def _build_plot(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 2.0), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(160)
        self.loss_axes = self.figure.add_subplot(111)
        self.f1_axes = self.loss_axes.twinx()
        self.native.layout().addWidget(self.canvas)
        self._draw_curves()

    def _draw_curves(self, _event=None) -> None:
        ax, ax2 = self.loss_axes, self.f1_axes
        ax.clear()
        ax2.clear()
        losses = [(e["iteration"], e["loss"]) for e in self.history if "loss" in e]
        vals = [(e["iteration"], e["object_f1"]) for e in self.history if "object_f1" in e]
        if losses:
            ax.plot(*zip(*losses), color="tab:blue", lw=1)
        if vals:
            ax2.plot(*zip(*vals), "o-", color="tab:orange", ms=3, lw=1)
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylabel("loss", fontsize=7, color="tab:blue")
        ax2.yaxis.tick_right()  # clear() forgets that a twin axis lives on the right
        ax2.yaxis.set_label_position("right")
        ax2.set_ylabel("val. object F1", fontsize=7, color="tab:orange")
        ax2.set_ylim(0, 1)
        for a in (ax, ax2):
            a.tick_params(labelsize=6)
        style_figure(self.figure, self.viewer)
        self.canvas.draw_idle()

    def add_pair(self, _value=None) -> PairRow:
        row = PairRow(self._image_layers, self._labels_layers)
        row.remove_button.changed.connect(lambda _v, row=row: self._remove_pair(row))
        self.pairs.append(row)
        images = [c for c in row.image_layer.choices if c is not None]
        labels = [c for c in row.labels_layer.choices if c is not None]
        taken = {r.image_layer.value for r in self.pair_rows[:-1]}
        free = [layer for layer in images if layer not in taken]
        if free:
            row.image_layer.value = free[0]
            match = [lab for lab in labels if lab.name.startswith(free[0].name)]
            if match or labels:
                row.labels_layer.value = (match or labels)[0]
        return row

    def _remove_pair(self, row: PairRow) -> None:
        if len(self.pairs) > 1:
            self.pairs.remove(row)

    @property
    def pair_rows(self) -> list[PairRow]:
        return list(self.pairs)

    # -- choices ---------------------------------------------------------------------------
    def _image_layers(self, _widget=None) -> list:
        # glas-seg's probability maps are not images to train on, nor its error layers labels.
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and fits(layer, (PROBABILITY,))]

    def _labels_layers(self, _widget=None) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels) and fits(layer, ERROR_ROLES)]

    def _shapes_layers(self, _widget=None) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Shapes)]

    def _model_names(self, _widget=None) -> list[str]:
        return [entry.name for entry in list_models()]

    def _refresh_layers(self, _event=None) -> None:
        for row in self.pair_rows:
            row.reset_choices()
        self.regions.reset_choices()

    def _refresh_base_models(self) -> None:
        self.base.reset_choices()

    def suggest_name(self) -> str:
        """``<base>-ft``, ``<base>-ft2``... : the first name not yet taken."""
        base = str(self.base.value or "model")
        taken = {entry.name for entry in list_models()}
        candidate, n = f"{base}-ft", 1
        while candidate in taken:
            n += 1
            candidate = f"{base}-ft{n}"
        return candidate

    # -- running ---------------------------------------------------------------------------
    def collect(self) -> tuple[list, list | None, str]:
        """Snapshot the chosen layers into training samples (in the GUI thread).

        Returns
        -------
        samples, masks, description

        Raises
        ------
        ValueError
            A missing or mismatched layer, with a message for the user.
        """
        rows = [r for r in self.pair_rows if r.image_layer.value is not None or r.labels_layer.value is not None]
        if not rows:
            raise ValueError("Choose an image layer and its corrected Labels layer")
        shapes = self.regions.value
        samples, masks, names = [], [], []
        for row in rows:
            image, labels = row.image_layer.value, row.labels_layer.value
            if image is None or labels is None:
                raise ValueError("Each pair needs both an image layer and a Labels layer")
            if image not in self.viewer.layers or labels not in self.viewer.layers:
                raise ValueError(f"Layer {image.name!r} or {labels.name!r} is no longer open")
            _check_pair_layers(image, labels)
            regions = shape_regions(shapes, labels) if shapes is not None else None
            pair_samples, pair_masks = samples_from_arrays(
                image.name, _plane_data(image), _plane_data(labels), bool(image.rgb), regions)
            if not pair_samples and shapes is not None:
                raise ValueError(f"No region of {shapes.name!r} lies on {labels.name!r}; draw a rectangle "
                                 "around the corrected area or remove the pair")
            if not pair_samples:
                raise ValueError(f"{labels.name!r} has no labels; correct some labels first")
            samples += pair_samples
            masks += pair_masks or []
            names.append(f"{image.name} / {labels.name}")
        description = "napari layers: " + "; ".join(names) + (f"; regions from {shapes.name}" if shapes is not None else "")
        return samples, (masks if shapes is not None else None), description

    def settings(self) -> FinetuneSettings:
        return FinetuneSettings(
            iterations=int(self.iterations.value), learning_rate=float(self.learning_rate.value) or None,
            augment=bool(self.augment.value), val_fraction=float(self.val_share.value), device=self.device.value,
            eval_every=max(10, int(self.iterations.value) // 8), layers=self.layers.value, l2sp=float(self.l2sp.value),
            augment_strength=float(self.augment_strength.value), patience=int(self.patience.value),
            freeze_norm=bool(self.freeze_norm.value), calibrate={"auto": None, "on": True, "off": False}[self.calibrate.value],
        )

    def run(self, _value=None) -> None:
        """Validate inputs, snapshot the layers and fine-tune in the background."""
        if self.task.running:
            show_info("glas-seg: a fine-tune is already running")
            return
        if not self.base.value:
            show_warning("glas-seg: no base model is available")
            return
        try:
            name = model_store.check_new_name(self.new_name.value)
            settings = self.settings()
            samples, masks, description = self.collect()
        except ValueError as exc:
            show_warning(f"glas-seg: {exc}")
            self.status.value = str(exc)
            return
        base = self.base.value
        relay = self.relay

        def job(report, cancel):
            def progress(event: dict) -> None:
                report(int(event["done" if "phase" in event else "iteration"]), int(event["total"]))
                relay.event.emit(dict(event))

            return finetune(base, samples, name, settings, valid_masks=masks, description=description,
                            progress=progress, cancel=cancel)

        self.history = []
        self._rate_start = None
        self.timing.value = ""
        self._draw_curves()
        self.segment_button.enabled = False
        self.panel.start(job, self._on_result, f"glas-seg: fine-tuning {name}",
                         f"Fine-tuning {base} on {len(samples)} image(s)...")

    def _on_event(self, event: dict) -> None:
        if "phase" in event:  # before or after training: one step per image
            self.timing.value = (f"{event['phase'].capitalize()}: image {event['done']} of {event['total']} "
                                 f"(elapsed {format_duration(event['elapsed'])})")
            return
        self.history.append(event)
        self._show_timing(event)
        now = time.monotonic()
        if "object_f1" in event or event["iteration"] == event["total"] or now - self._last_draw > 0.5:
            self._last_draw = now
            self._draw_curves()

    def _show_timing(self, event: dict) -> None:
        """Elapsed time and, from the iteration rate so far, an estimate of the time left."""
        if "elapsed" not in event or event.get("iteration", 0) < 1:
            return
        iteration, elapsed = event["iteration"], event["elapsed"]
        if self._rate_start is None:  # the first step also paid for setup (and the first scoring)
            self._rate_start = (iteration, elapsed)
        done, since = iteration - self._rate_start[0], elapsed - self._rate_start[1]
        per_step = since / done if done > 0 else elapsed / iteration
        left = max(0, event["total"] - iteration) * per_step
        self.timing.value = (f"Elapsed {format_duration(elapsed)}, about {format_duration(left)} left "
                             f"({per_step:.2f} s per iteration)")

    def _on_result(self, result) -> None:
        self.last_result = result
        name = result.entry.name
        text = f"Saved model {name!r} ({result.wall_seconds:.0f} s; trained {result.layers}, lr {result.learning_rate:g})."
        for report in (format_thresholds(result), format_before_after(result)):
            if report:
                text += f" {report}."
        self.timing.value = f"Took {format_duration(result.wall_seconds)}"
        self.status.value = text
        show_info(f"glas-seg: {text}")
        segment = self.segment_widget(open_it=False)
        if segment is not None:
            segment.refresh_models(select=name)
        self._refresh_base_models()
        self.new_name.value = self.suggest_name()
        self.segment_button.enabled = True

    def _on_finished(self, _status: str) -> None:
        self._draw_curves()

    # -- using the new model ---------------------------------------------------------------------
    def segment_widget(self, open_it: bool = True):
        """The viewer's Segment widget (opened when ``open_it`` and not yet docked)."""
        from ._widget_segment import SegmentWidget

        for widget in self.viewer.window.dock_widgets.values():
            if isinstance(widget, SegmentWidget):
                return widget
        if not open_it:
            return None
        return self.viewer.window.add_plugin_dock_widget(*SEGMENT_WIDGET)[1]

    def segment_with_new_model(self, _value=None):
        """Segment the current image layer with the model just fine-tuned (one click)."""
        if self.last_result is None:
            show_warning("glas-seg: fine-tune a model first")
            return None
        segment = self.segment_widget()
        raise_tab(segment.native)
        segment.refresh_models(select=self.last_result.entry.name)
        active = self.viewer.layers.selection.active
        if active is not None and active in segment.image.choices:
            segment.image.value = active
        elif self.pair_rows and self.pair_rows[0].image_layer.value in segment.image.choices:
            segment.image.value = self.pair_rows[0].image_layer.value
        segment.run()
        return segment
