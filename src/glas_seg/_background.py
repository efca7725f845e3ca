"""Run backend work off the main thread with progress, cancel and error messages.

Shared by every dock widget, so that each long task behaves the same way: the viewer stays
responsive, napari's activity dock and the widget's own bar show progress, Cancel stops at the
next checkpoint, and an expected failure (bad input, damaged file) is a notification, never a
traceback dialog.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from .backend.inference import Cancelled

EXPECTED_ERRORS = (ValueError, FileNotFoundError, PermissionError, OSError, MemoryError)


class BackgroundTask(QObject):
    """One background job at a time.

    ``fn(report, cancel_event)`` runs in a worker thread; ``report(done, total)`` may be called
    from that thread. ``on_result(value)`` runs in the main thread when ``fn`` returns.
    """

    progressed = Signal(int, int)
    finished = Signal(str)  # "done", "cancelled" or "failed"

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.cancel_event = threading.Event()
        self.worker = None
        self._bar = None
        self.last_error: str | None = None
        self.progressed.connect(self._on_progress)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, fn: Callable[..., Any], on_result: Callable[[Any], None], description: str) -> None:
        if self.running:
            raise RuntimeError("A task is already running")
        self.cancel_event = threading.Event()
        self.last_error = None
        self._bar = napari_progress(total=0, desc=description)
        cancel_event = self.cancel_event

        def job():
            try:
                return "done", fn(self.progressed.emit, cancel_event)
            except Cancelled:
                return "cancelled", None
            except EXPECTED_ERRORS as exc:
                return "failed", str(exc) or type(exc).__name__

        worker = create_worker(job)
        worker.returned.connect(lambda out: self._on_returned(out, on_result))
        worker.errored.connect(self._on_errored)
        self.worker = worker
        worker.start()

    def cancel(self) -> None:
        self.cancel_event.set()

    def _on_progress(self, done: int, total: int) -> None:
        if self._bar is not None:
            if self._bar.total != total:
                self._bar.total = total
            self._bar.n = done
            self._bar.refresh()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.worker = None

    def _on_returned(self, out, on_result) -> None:
        status, value = out
        self._close()
        if status == "done":
            try:
                on_result(value)
            except EXPECTED_ERRORS as exc:
                status, self.last_error = "failed", str(exc)
                show_error(f"glas-seg: {exc}")
        elif status == "cancelled":
            show_info("glas-seg: cancelled; nothing was changed")
        else:
            self.last_error = value
            show_error(f"glas-seg: {value}")
        self.finished.emit(status)

    def _on_errored(self, exc: Exception) -> None:
        # Unexpected bugs: still a message, not a crash, and the widget becomes usable again.
        self._close()
        self.last_error = f"{type(exc).__name__}: {exc}"
        show_error(f"glas-seg: unexpected error: {self.last_error}")
        self.finished.emit("failed")
