"""Metrics dock widget: prediction + ground truth (+ probability) -> GlaS scores, ROC, error layers.

On a slide (a prediction or ground truth that is a slide's labels, a region of them, or any
multiscale layer) the two layers are cut to a region in world coordinates first
(:func:`._slide_edit.region_crops`): the whole of an in-memory prediction (an *Edit region*
layer), or the *Slide region* of a slide's lazy labels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, PushButton, Table
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info, show_warning

from ._background import TaskPanel
from ._dock import dock_as_tab, style_figure
from ._layers import (
    ERROR_ROLES, FALSE_NEGATIVES, FALSE_POSITIVES, METADATA_KEY, SEGMENTATION, adding_layers, fits, role,
)
from ._slide_edit import SLIDE_ROLES, is_slide_pair, region_crops
from ._slide_widget import SHAPES, VISIBLE, WHOLE
from ._widget_segment import unique_layer_name, writable_labels_layer
from .backend.errors import GlasSegError
from .backend.inference import Cancelled
from .backend.metrics import planes
from .backend.metrics_report import COLUMNS, Report, score_set, write_csv, write_json
from .backend.stacks import fingerprint

if TYPE_CHECKING:
    import napari

TRUTH_HINTS = ("anno", "truth", "gt", "ground", "mask")
ROW_TITLES = {
    "object_f1": "Object F1", "object_dice": "Object Dice", "object_hausdorff": "Object Hausdorff (px)",
    "object_precision": "Object precision", "object_recall": "Object recall",
    "tp": "True positives", "fp": "False positives", "fn": "False negatives",
    "n_pred": "Predicted objects", "n_gt": "Ground-truth objects", "count_error": "Count error (pred - gt)",
    "pixel_precision": "Pixel precision", "pixel_recall": "Pixel recall", "pixel_dice": "Pixel Dice (F1)",
    "pixel_iou": "Pixel IoU", "pixel_accuracy": "Pixel accuracy", "pixel_specificity": "Pixel specificity",
    "roc_auc": "ROC AUC",
}


COUNT_KEYS = ("tp", "fp", "fn", "n_pred", "n_gt", "count_error")


def format_value(key: str, value: float) -> str:
    """Table text: whole counts as integers, distances and mean counts with 2 decimals, scores with 3."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    if key in COUNT_KEYS and float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}" if key in COUNT_KEYS + ("object_hausdorff",) else f"{value:.3f}"


def table_value(report: Report) -> dict:
    """magicgui ``Table`` value: one row per metric, columns pooled / mean / each plane."""
    columns = {"value": report.pooled} if len(report.images) == 1 else {
        "pooled": report.pooled, "mean per plane": report.mean_per_image,
        **{name: result.row for name, result in report.images.items()}}
    data = [[format_value(key, row.get(key, math.nan)) for row in columns.values()] for key in COLUMNS]
    return {"data": data, "index": [ROW_TITLES[k] for k in COLUMNS], "columns": list(columns)}


def plane_name(index: tuple[int, ...]) -> str:
    return "image" if not index else f"plane {index[0]}" if len(index) == 1 else f"plane {index}"


def fit_probability(probability: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A probability plane resampled (bilinear) to the labels' plane shape when they differ."""
    probability = np.asarray(probability, dtype=np.float32)
    if probability.shape == shape:
        return probability
    from skimage.transform import resize

    return resize(probability, shape, order=1, preserve_range=True, anti_aliasing=False).astype(np.float32)


def error_labels(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Copy of ``labels`` keeping only the objects in ``ids`` (ids unchanged)."""
    return np.where(np.isin(labels, ids), labels, 0).astype(labels.dtype, copy=False)


class MetricsWidget(Container):
    """Score a prediction Labels layer against a ground-truth Labels layer, GlaS style."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.report: Report | None = None
        self.panel = TaskPanel("Evaluate")
        self.task, self.run_button, self.cancel_button = self.panel.task, self.panel.run_button, self.panel.cancel_button
        self.progress, self.status = self.panel.progress, self.panel.status

        self.prediction = ComboBox(label="Prediction", choices=self._labels_layers, nullable=True)
        self.ground_truth = ComboBox(label="Ground truth", choices=self._labels_layers, nullable=True)
        self.slide_region = ComboBox(label="Slide region", choices=[VISIBLE, SHAPES, WHOLE], value=VISIBLE,
                                     visible=False, tooltip="the part of the slide's labels to score")
        self._region_note = ""
        self.probability = ComboBox(label="Probability (optional)", choices=self._image_layers, nullable=True)
        self.add_errors = CheckBox(text="Show false positives / negatives as layers", value=True)
        self.table = Table(value={"data": [], "index": [], "columns": []})
        self.table.read_only = True
        self._plain_table_text()
        self.export_csv = PushButton(text="Export CSV...", enabled=False)
        self.export_json = PushButton(text="Export JSON...", enabled=False)
        exports = Container(layout="horizontal", widgets=[self.export_csv, self.export_json], labels=False)
        self.extend([self.prediction, self.ground_truth, self.slide_region, self.probability, self.add_errors, *self.panel.widgets,
                     self.table, exports])
        self.figure = Figure(figsize=(3.2, 3.0), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.canvas.setVisible(False)
        self.native.layout().addWidget(self.canvas)
        dock_as_tab(self.native)
        napari_viewer.events.theme.connect(self._restyle)

        self.run_button.changed.connect(self.run)
        self.export_csv.changed.connect(lambda: self._export_dialog("csv"))
        self.export_json.changed.connect(lambda: self._export_dialog("json"))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh)
        self.prediction.changed.connect(self._show_region_choice)
        self._refresh()

    # -- choices ---------------------------------------------------------------------------
    def _labels_layers(self, _widget=None) -> list:
        # Error layers written by this widget are results, not inputs.
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels) and fits(layer, ERROR_ROLES)]

    def _image_layers(self, _widget=None) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and not layer.rgb]

    def _refresh(self, _event=None) -> None:
        """Reset the choices, and guess unset inputs: a layer called ``*anno*`` is the truth.

        A segmentation glas-seg wrote is never guessed to be the ground truth; the newest one is
        the prediction.
        """
        self.reset_choices()
        layers = [layer for layer in self.prediction.choices if layer is not None]
        if self.ground_truth.value is None:
            candidates = [l for l in layers if role(l) not in (SEGMENTATION, *SLIDE_ROLES)]
            hinted = [l for l in candidates if any(h in l.name.lower() for h in TRUTH_HINTS)]
            if hinted or candidates:
                self.ground_truth.value = (hinted or candidates)[0]
        if self.prediction.value is None:
            others = [l for l in layers if l is not self.ground_truth.value]
            ours = [l for l in others if role(l) in (SEGMENTATION, *SLIDE_ROLES)]
            if ours or others:
                self.prediction.value = (ours or others)[-1]  # the most recently added one
        self._show_region_choice()

    def _show_region_choice(self, _value=None) -> None:
        pred = self.prediction.value
        self.slide_region.visible = bool(pred is not None and pred.multiscale)

    # -- running ---------------------------------------------------------------------------
    def _inputs(self):
        """The chosen layers' arrays, or a message saying what is wrong."""
        pred, gt, prob = self.prediction.value, self.ground_truth.value, self.probability.value
        if pred is None or gt is None:
            return "choose a prediction and a ground-truth Labels layer"
        if pred is gt:
            return "prediction and ground truth are the same layer"
        self._region_note = ""
        if is_slide_pair(pred, gt):  # a slide region: both cut to it in world coordinates
            if prob is not None:
                return "a probability layer is not used on a slide region; clear Probability"
            try:
                crops = region_crops(self.viewer, pred, gt, self.slide_region.value)
            except GlasSegError as exc:
                return str(exc)
            self._region_note = crops.note
            return pred, gt, crops.pred, crops.gt, None, (crops.pred_translate, crops.gt_translate)
        pred_data, gt_data = (l.data[0] if l.multiscale else l.data for l in (pred, gt))
        if pred_data.shape != gt_data.shape:
            return f"{pred.name!r} {tuple(pred_data.shape)} and {gt.name!r} {tuple(gt_data.shape)} differ in shape"
        prob_data = None
        if prob is not None:
            prob_data = prob.data[0] if prob.multiscale else prob.data
            if prob_data.ndim != gt_data.ndim or prob_data.shape[:-2] != gt_data.shape[:-2]:
                return f"probability {tuple(prob_data.shape)} does not match the labels {tuple(gt_data.shape)}"
        return pred, gt, pred_data, gt_data, prob_data, (pred.translate, gt.translate)

    def run(self) -> None:
        """Check the inputs, then score every plane in the background."""
        if self.task.running:
            show_info("glas-seg: an evaluation is already running")
            return
        inputs = self._inputs()
        if isinstance(inputs, str):
            self.status.value = inputs[0].upper() + inputs[1:] + "."
            show_warning(f"glas-seg: {inputs}")
            return
        pred, gt, pred_data, gt_data, prob_data, translates = inputs
        indices = list(planes(gt_data.shape))
        want_errors = self.add_errors.value
        region = bool(self._region_note)

        def job(report, cancel):
            fp, fn = {}, {}
            # A slide region's lazy crops are read once, here in the background.
            seg_data, truth_data = (np.asarray(pred_data), np.asarray(gt_data)) if region else (pred_data, gt_data)

            def items():
                for index in indices:
                    if cancel.is_set():
                        raise Cancelled()
                    seg, truth = np.asarray(seg_data[index]), np.asarray(truth_data[index])
                    prob = None if prob_data is None else fit_probability(prob_data[index], truth.shape)
                    yield plane_name(index), seg, truth, prob

            result = score_set(items(), progress=report, total=len(indices))
            if want_errors:
                for index, plane in zip(indices, result.images.values()):
                    fp[index] = plane.matches[0].false_positive_ids
                    fn[index] = plane.matches[0].false_negative_ids
            return result, fp, fn, seg_data, truth_data

        where = f" {self._region_note}" if self._region_note else f" ({len(indices)} plane{'s' * (len(indices) > 1)})"
        self.panel.start(job, lambda out: self._show(pred, gt, out[3], out[4], translates, *out[:3]),
                         f"glas-seg: evaluating {pred.name}", f"Evaluating {pred.name} against {gt.name}{where}...")

    # -- results ---------------------------------------------------------------------------
    def _show(self, pred, gt, pred_data, gt_data, translates, report: Report, fp: dict, fn: dict) -> None:
        self.report = report
        self.table.value = table_value(report)
        self._fit_table_columns()
        self.export_csv.enabled = self.export_json.enabled = True
        self._plot_roc(report)
        if fp or fn:
            with adding_layers(self.viewer):  # the user's selection (and Edit's Labels box) stays put
                self._write_errors(pred, pred_data, fp, FALSE_POSITIVES, "red", translates[0])
                self._write_errors(gt, gt_data, fn, FALSE_NEGATIVES, "cyan", translates[1])
        p = report.pooled
        self.status.value = (f"F1 {p['object_f1']:.3f}, object Dice {p['object_dice']:.3f}, object Hausdorff "
                             f"{format_value('object_hausdorff', p['object_hausdorff'])} px"
                             + (f" (pooled over {len(report.images)} planes)" if len(report.images) > 1 else "")
                             + f"; {p['fp']} false positive(s), {p['fn']} false negative(s)"
                             + (f" {self._region_note}" if self._region_note else ""))

    def _plot_roc(self, report: Report) -> None:
        self.figure.clear()
        if report.roc is None:
            self.canvas.setVisible(False)
            return
        fpr, tpr, _ = report.roc
        if fpr.size > 4000:  # thin the curve for drawing; the AUC was computed on all of it
            keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, 4000).astype(int), fpr.size - 1])
            fpr, tpr = fpr[keep], tpr[keep]
        ax = self.figure.add_subplot(111)
        ax.plot(fpr, tpr, color="tab:orange", lw=1.5)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
               title=f"Pixel ROC, AUC {report.pooled['roc_auc']:.3f}")
        style_figure(self.figure, self.viewer)
        self.canvas.setVisible(True)
        self.canvas.draw_idle()

    def _restyle(self, _event=None) -> None:
        style_figure(self.figure, self.viewer)
        self.canvas.draw_idle()

    def _plain_table_text(self) -> None:
        """Show the table's text as :func:`format_value` wrote it.

        magicgui's Table reformats every number-like text with 4 decimals ("1.0000", "5.000e-02").
        """
        from qtpy.QtWidgets import QHeaderView, QStyledItemDelegate

        table = self.table.native
        table.setItemDelegate(QStyledItemDelegate(table))
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        table.horizontalHeader().setStretchLastSection(True)
        rows = table.verticalHeader()
        rows.setMinimumSectionSize(table.fontMetrics().height() + 4)
        rows.setDefaultSectionSize(table.fontMetrics().height() + 4)  # compact rows: all 18 fit a tab
        self.table.min_height = 200

    def _fit_table_columns(self) -> None:
        """Columns as wide as their text; every row visible without scrolling where it fits a tab."""
        table = self.table.native
        table.resizeColumnsToContents()
        rows = table.verticalHeader().length() + table.horizontalHeader().height() + 2 * table.frameWidth()
        self.table.min_height = min(max(rows, 200), 400)

    def _write_errors(self, source: Labels, data, ids: dict, what: str, colour: str, translate) -> None:
        """A new (or our own, unedited) Labels layer with the listed objects of ``source`` (``data``:
        its pixels that were scored, placed at ``translate``).

        No errors of this kind: no layer, and our own unedited one from an earlier run is removed.
        """
        layer = writable_labels_layer(self.viewer, f"{source.name} {what}")
        if not any(len(wanted) for wanted in ids.values()):
            if layer is not None:
                self.viewer.layers.remove(layer)
            return
        full = np.zeros(data.shape, dtype=np.asarray(data[next(iter(ids))]).dtype)
        for index, wanted in ids.items():
            full[index] = error_labels(np.asarray(data[index]), wanted)
        name = f"{source.name} {what}"
        meta = {METADATA_KEY: {"role": what, "fingerprint": fingerprint(full), "source": source.name}}
        colormap = DirectLabelColormap(color_dict={None: colour, 0: "transparent"})
        if layer is not None:
            layer.data, layer.metadata, layer.translate = full, meta, translate
        else:
            self.viewer.add_labels(full, name=unique_layer_name(self.viewer, name), metadata=meta, opacity=0.6,
                                   colormap=colormap, scale=source.scale, translate=translate)

    # -- export ----------------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """Write the last report to ``path`` (``.csv`` or ``.json``, see docs/metrics.md)."""
        if self.report is None:
            raise ValueError("Nothing to export yet: press Evaluate first")
        path = Path(path)
        writers = {".csv": write_csv, ".json": write_json}
        if path.suffix.lower() not in writers:
            raise ValueError(f"Export to .csv or .json, not {path.suffix or 'a file without suffix'}")
        writers[path.suffix.lower()](self.report, path)
        return path

    def _export_dialog(self, kind: str) -> None:
        from qtpy.QtWidgets import QFileDialog

        if self.report is None:
            show_warning("glas-seg: press Evaluate first")
            return
        path, _ = QFileDialog.getSaveFileName(self.native, f"Export metrics as {kind.upper()}", f"metrics.{kind}",
                                              f"{kind.upper()} files (*.{kind})")
        if not path:
            return
        try:
            show_info(f"glas-seg: metrics written to {self.export(path)}")
        except (OSError, ValueError) as exc:
            show_error(f"glas-seg: could not export: {exc}")
