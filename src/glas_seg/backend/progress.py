"""The one progress / cancel contract of every long-running glas-seg function.

Segmentation, evaluation, training and fine-tuning take the same two keyword arguments
(docs/progress.md):

``progress``
    A callable ``progress(done, total)`` with two ints, called from the thread doing the work
    after each unit of work (a tile batch, an image, an optimizer step); ``total`` stays the same
    during a run and ``done`` grows up to it. Training and fine-tuning also take an ``on_event``
    callable that receives the loss and validation metrics as a dict.
``cancel``
    A :class:`threading.Event` (set it from any thread) or a callable returning True to stop.
    It is checked between units of work; the function then raises :class:`Cancelled` and keeps
    nothing it was computing (fine-tuning writes no model).

This module imports neither torch nor napari, so that callers can catch :class:`Cancelled`
without loading either.
"""

from __future__ import annotations

import threading
from typing import Callable, Union

from .errors import GlasSegError

#: ``progress(done, total)``: ``done`` units of work of ``total`` are finished.
ProgressCallback = Callable[[int, int], None]
#: What ``cancel`` may be: an event, a callable returning True to stop, or None.
CancelToken = Union[threading.Event, Callable[[], bool], None]


class Cancelled(Exception):
    """Raised inside a run when the user cancels it; nothing it was computing is kept."""


def check_callbacks(progress: ProgressCallback | None, cancel: CancelToken) -> None:
    """Refuse callbacks of the wrong kind up front, before any work starts.

    Raises
    ------
    GlasSegError
        ``progress`` is not callable, or ``cancel`` is neither an Event nor callable.
    """
    if progress is not None and not callable(progress):
        raise GlasSegError(f"progress must be a callable progress(done, total), not {type(progress).__name__}")
    if cancel is not None and not (isinstance(cancel, threading.Event) or callable(cancel)):
        raise GlasSegError(f"cancel must be a threading.Event or a callable returning True to stop, "
                           f"not {type(cancel).__name__}")


def is_cancelled(cancel: CancelToken) -> bool:
    """Whether ``cancel`` (an Event, a callable or None) asks to stop now."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def raise_if_cancelled(cancel: CancelToken) -> None:
    """Raise :class:`Cancelled` when ``cancel`` asks to stop."""
    if is_cancelled(cancel):
        raise Cancelled()


def step_progress(progress: ProgressCallback | None) -> Callable[[dict], None] | None:
    """Adapt ``progress(done, total)`` to the training loop's event dicts
    (``{"iteration": i, "total": n, ...}``); None stays None."""
    if progress is None:
        return None

    def on_event(event: dict) -> None:
        if "iteration" in event and "total" in event:
            progress(int(event["iteration"]), int(event["total"]))

    return on_event
