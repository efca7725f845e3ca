"""Dock layout shared by the glas-seg widgets: one tab group, themed plots, wrapped text.

napari docks every widget opened from the Plugins menu below the previous one; four glas-seg
widgets stacked that way outgrow a 1000 px screen. Each glas-seg widget therefore joins the
glas-seg docks already open in the same dock area as a tab (Qt's own ``tabifyDockWidget``, as
napari does for ``add_dock_widget(..., tabify=True)``), so that one widget at a time gets the
whole height.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QDockWidget, QMainWindow, QSizePolicy, QWidget

if TYPE_CHECKING:
    import napari
    from matplotlib.figure import Figure

DOCK_PROPERTY = "glas_seg_dock"


def _dock_of(native: QWidget) -> tuple[QDockWidget, QMainWindow] | None:
    dock = native.parentWidget()
    window = dock.parentWidget() if isinstance(dock, QDockWidget) else None
    return (dock, window) if isinstance(window, QMainWindow) else None


def glas_seg_docks(window: QMainWindow) -> list[QDockWidget]:
    """The docks of ``window`` that hold a glas-seg widget, in the order they were created."""
    return [dock for dock in window.findChildren(QDockWidget)
            if dock.widget() is not None and dock.widget().property(DOCK_PROPERTY)]


def join_tabs(native: QWidget) -> bool:
    """Tabify the dock holding ``native`` with the other open glas-seg docks of its area.

    Returns whether it joined a tab group (False: not docked yet, floating, or the first one).
    """
    found = _dock_of(native)
    if found is None:
        return False
    dock, window = found
    if dock.isFloating():
        return False
    area = window.dockWidgetArea(dock)
    others = [other for other in glas_seg_docks(window) if other is not dock and not other.isHidden()
              and not other.isFloating() and window.dockWidgetArea(other) == area]
    if not others or dock in window.tabifiedDockWidgets(others[-1]):
        return False
    window.tabifyDockWidget(others[-1], dock)
    dock.show()
    dock.raise_()
    return True


def raise_tab(native: QWidget) -> None:
    """Bring the tab holding ``native`` to the front (shown again if it was closed)."""
    found = _dock_of(native)
    if found is not None:
        found[0].show()
        found[0].raise_()


class _JoinTabsWhenDocked(QObject):
    """Waits for napari to put the widget in a dock, then joins the glas-seg tabs."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() == QEvent.Type.ParentChange:
            # napari adds the dock to its window right after setting the widget's parent.
            QTimer.singleShot(0, self._join)
        return False

    def _join(self) -> None:
        native = self.parent()
        if isinstance(native, QWidget):
            join_tabs(native)


def dock_as_tab(native: QWidget) -> None:
    """Mark ``native`` as a glas-seg dock widget that joins the others as a tab once docked."""
    native.setProperty(DOCK_PROPERTY, True)
    native.installEventFilter(_JoinTabsWhenDocked(native))  # dies with the widget


class _FitWrappedHeight(QObject):
    """Keeps a word-wrapped QLabel as tall as its lines at its current width.

    (magicgui's labelled rows do not pass Qt's height-for-width on, so the label would keep the
    height of its unwrapped text and clip the rest.)
    """

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if event.type() == QEvent.Type.Resize:
            self.fit()
        return False

    def fit(self, *_args) -> None:
        label = self.parent()
        height = label.heightForWidth(max(label.width(), 1))
        if height > 0 and height != label.minimumHeight():
            label.setMinimumHeight(height)


def wrap_text(label_widget) -> None:
    """Let a magicgui ``Label`` wrap long text instead of widening the dock."""
    native = label_widget.native
    native.setWordWrap(True)
    # Its text's width is no claim on the dock's width; its height follows the wrapped lines.
    policy = native.sizePolicy()
    policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)
    native.setSizePolicy(policy)
    fitter = _FitWrappedHeight(native)  # dies with the label
    native.installEventFilter(fitter)
    label_widget.changed.connect(fitter.fit)


# -- matplotlib plots in napari's colours -----------------------------------------------------
def theme_colours(viewer: "napari.Viewer") -> dict[str, str]:
    """Background, text and grid colours of the viewer's napari theme (dark by default)."""
    from napari.utils.theme import get_theme

    theme = get_theme(viewer.theme)
    return {"background": theme.background.as_hex(), "text": theme.text.as_hex(),
            "grid": theme.primary.as_hex()}


def style_figure(figure: "Figure", viewer: "napari.Viewer") -> None:
    """Colour a figure's background, frames, ticks and texts after the viewer's theme.

    Axis labels coloured on purpose (not black) keep their colour.
    """
    colours = theme_colours(viewer)
    figure.set_facecolor(colours["background"])
    for ax in figure.axes:
        ax.set_facecolor(colours["background"])
        ax.tick_params(colors=colours["text"], which="both")
        for spine in ax.spines.values():
            spine.set_color(colours["grid"])
        for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
            if text.get_color() in ("black", "k", "#000000"):
                text.set_color(colours["text"])
