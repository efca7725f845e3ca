"""Run backend work off the main thread with progress, cancel and error messages.

Shared by every dock widget, so that each long task behaves the same way: the viewer stays
responsive, napari's activity dock and the widget's own bar show progress, Cancel stops at the
next checkpoint, and an expected failure (bad input, damaged file) is a notification, never a
traceback dialog.
"""

from __future__ import annotations

import sys


def _keep_triton_out() -> None:
    """Tell torch there is no Triton in this (napari) process, unless it is already loaded.

    Training (fine-tuning) imports torchvision, whose import pulls in ``torch._dynamo``, which probes for
    Triton by importing it. Triton's compiler library carries its own LLVM; loaded into a process
    where an OpenGL driver built on LLVM (Mesa: llvmpipe under Xvfb, radeonsi...) is already
    loaded, as in napari once its canvas exists, the process segfaults. glas-seg never compiles
    kernels, so ``import triton`` is made to raise ImportError instead, which torch handles.
    """
    if "triton" not in sys.modules:
        sys.modules["triton"] = None


# Every dock widget that runs backend work imports this module before the backend.
_keep_triton_out()

import threading  # noqa: E402  (imports after the Triton guard on purpose)
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

from napari.qt.threading import create_worker  # noqa: E402
from napari.utils import progress as napari_progress  # noqa: E402
from napari.utils.notifications import show_error, show_info  # noqa: E402
from qtpy.QtCore import QObject, Signal  # noqa: E402

from .backend.inference import Cancelled  # noqa: E402

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


def format_duration(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for a number of seconds."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class TaskPanel:
    """Run and Cancel buttons, a progress bar and a status line bound to one :class:`BackgroundTask`.

    Every dock widget that runs long work puts these four controls in its layout
    (``panel.widgets``) and calls :meth:`start`; the panel disables Run while the task is under
    way and reports how it ended.
    """

    def __init__(self, run_text: str, cancelled_text: str = "Cancelled; no layer was changed.",
                 show_time_left: bool = True) -> None:
        from magicgui.widgets import Label, ProgressBar, PushButton

        from ._dock import wrap_text

        self.task = BackgroundTask()
        self.run_button = PushButton(text=run_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, visible=False)
        self.status = Label(value="")
        wrap_text(self.status)
        self.cancelled_text = cancelled_text
        # The status line then also gives "done / total, elapsed, about ... left" (off where the
        # widget shows its own timing, as Fine-tune does).
        self.show_time_left = show_time_left
        self._status_text, self._started = "", 0.0
        self.cancel_button.changed.connect(self.task.cancel)
        self.task.progressed.connect(self._on_progress)
        self.task.finished.connect(self._on_finished)

    @property
    def widgets(self) -> list:
        return [self.run_button, self.cancel_button, self.progress, self.status]

    def start(self, fn: Callable[..., Any], on_result: Callable[[Any], None], description: str, status: str) -> None:
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0
        self.progress.visible = True
        self.status.value = self._status_text = status
        self._started = time.perf_counter()
        self.task.start(fn, on_result, description)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done
        if self.show_time_left and 0 < done < total:
            elapsed = time.perf_counter() - self._started
            left = elapsed / done * (total - done)  # the rate so far
            self.status.value = (f"{self._status_text} {done} / {total}, {format_duration(elapsed)} elapsed, "
                                 f"about {format_duration(left)} left")

    def _on_finished(self, status: str) -> None:
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress.visible = False
        if status == "cancelled":
            self.status.value = self.cancelled_text
        elif status == "failed":
            self.status.value = f"Failed: {self.task.last_error}"
