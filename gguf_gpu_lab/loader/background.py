"""A load on a thread of its own, so that the caller can do other work meanwhile (``hf.from_gguf``
builds the transformers model while its weights load)."""

from __future__ import annotations

import threading
import time

from ..progress import LoadBar, check_progress
from . import load
from .plan import select


class BackgroundLoad:
    """``load(model, **options)`` started now on a thread of its own. ``result()`` waits for it
    and re-raises its error; ``cancel()`` stops it and drops what it loaded. A bar
    (``progress=True``) is made here, on the caller's thread, where a notebook can show it.

    Example:
        >>> from gguf_gpu_lab import open_model
        >>> bg = BackgroundLoad(open_model("model.gguf"), {"backend": "host"})
        >>> r = bg.result()       # meanwhile the caller did something else
        >>> r["blk.0.attn_q.weight"].array.shape
        (256, 256)
    """

    def __init__(self, model, options: dict):
        options = dict(options)
        progress = options.pop("progress", None)
        check_progress(progress)
        self._bar = None
        if progress is True:
            total = sum(t.n_bytes for t in select(model.tensors, options.get("tensors"), options.get("order", "file")))
            progress = self._bar = LoadBar(f"load ({options.get('mode', 'gpu')})", total)
        self._stop = threading.Event()
        if options.get("cancel") is None:
            options["cancel"] = self._stop
        else:  # the caller's own cancel event stays theirs: this one stops the load through its progress hook
            progress = self._relay(progress)
        options["progress"] = progress
        self.load_s: float | None = None
        self.error: BaseException | None = None
        self._result = None
        self._thread = threading.Thread(target=self._run, args=(model, options), name="gguf-lab-load", daemon=True)
        self._thread.start()

    def _relay(self, progress):
        stop = self._stop

        def relay(done, total, name=None):
            if stop.is_set():
                return False
            return None if progress is None else progress(done, total, name)

        return relay

    def _run(self, model, options: dict) -> None:
        t0 = time.perf_counter()
        try:
            self._result = load(model, **options)
        except BaseException as e:  # re-raised by result()
            self.error = e
        finally:
            self.load_s = time.perf_counter() - t0

    def result(self):
        """Wait for the load; its ``LoadResult``, or its error raised here."""
        try:
            self._thread.join()
        except BaseException:  # an interrupt while waiting: the load stops too
            self.cancel()
            raise
        self._close_bar()
        if self.error is not None:
            raise self.error
        return self._result

    def cancel(self) -> None:
        """Stop the load, wait for its threads, and drop whatever it loaded."""
        self._stop.set()
        self._thread.join()
        self._close_bar()
        self._result = None
        self.error = None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def load_while(model, options: dict, work):
    """``load(model, **options)`` on a thread of its own while ``work()`` runs on this one;
    returns (what ``work`` returned, the ``LoadResult``, the load's seconds, the seconds this
    thread then waited for it). An error in ``work`` (or an interrupt) cancels the load and
    frees what it loaded; an error of the load is raised here."""
    bg = BackgroundLoad(model, options)
    try:
        done = work()
        t0 = time.perf_counter()
        result = bg.result()
    except BaseException:
        bg.cancel()
        raise
    return done, result, bg.load_s, time.perf_counter() - t0
