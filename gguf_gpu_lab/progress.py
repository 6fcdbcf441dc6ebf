"""Progress bars for the command line and ``load(progress=True)``: tqdm (an ipywidgets bar in
notebooks), decimal units like the summaries (kB, MB, GB), and shown only where someone can
watch them: a terminal, a notebook, or ``GGUF_LAB_PROGRESS=1`` (``0`` hides them everywhere).

A load's bar (``LoadBar``) is set up before the load starts, with its total, and made and drawn
by a thread of its own: the load's completion thread only stores a tuple, so nothing a bar does
(a notebook widget's messages, a terminal's writes) can delay a chunk; a load shorter than
``SHOW_AFTER_S`` makes no bar at all."""

from __future__ import annotations

import contextvars
import functools
import os
import sys
import threading
import time

from .errors import GGUFLabError

DRAW_INTERVAL_S = 0.1  # a bar is redrawn at most this often: 10 times a second reads as smooth
SHOW_AFTER_S = 0.2  # a load's bar is made only once the load has run this long (LoadBar)


def shown() -> bool:
    """Whether bars are drawn: a terminal on stderr or a notebook, unless GGUF_LAB_PROGRESS says
    otherwise. A log file would only collect carriage-return fragments."""
    forced = os.environ.get("GGUF_LAB_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    from tqdm.auto import tqdm

    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    return notebook or sys.stderr.isatty()


def check_progress(progress) -> None:
    """Refuse a ``progress=`` argument that is not None, False, True or a callable, before any
    work: a string or a number would otherwise fail at the first chunk, mid-load."""
    if progress is None or progress is False or progress is True or callable(progress):
        return
    raise GGUFLabError(f"progress must be None or False (no report), True (a bar) or a callable "
                       f"progress(bytes_done, bytes_total, tensor); got {progress!r}")


def progress_bar(desc: str, total: int | None = None, unit: str = "B", *, done: int = 0,
                 since: float | None = None):
    """A tqdm bar that removes itself when closed, except where stderr is no terminal (a log with
    ``GGUF_LAB_PROGRESS=1``: it ends with the last state, not a partial draw the close would
    erase); disabled where ``shown()`` is False. A bar
    made after its work started is given ``done``, the count reached, and ``since``, when the
    work started (a ``time.time()``), so that its elapsed time and rate are the work's: a bar
    made at 0 some time into a load would credit every byte done by then to its first draw.

    Example:
        >>> bar = progress_bar("fuzz", total=100, unit="case")
        >>> bar.update(1); bar.close()
    """
    from tqdm.auto import tqdm

    show = shown()
    notebook = show and _in_notebook(tqdm)
    if notebook:
        tqdm = _notebook_bar()
    bar = tqdm(total=total, initial=done, desc=desc, unit=unit, unit_scale=True, unit_divisor=1000,
               leave=show and not notebook and not sys.stderr.isatty(), disable=not show)
    if since is not None and not bar.disable:
        # as if made at the start with 0: its rate is the bytes done over the time since then
        bar.start_t = bar.last_print_t = since
        bar.initial = bar.last_print_n = 0
        bar.refresh()
    return bar


def _in_notebook(tqdm_class) -> bool:
    return any(c.__module__ == "tqdm.notebook" for c in tqdm_class.__mro__)


@functools.cache
def _notebook_bar():
    """tqdm's notebook bar, drawn at its end state when closed. tqdm skips updates that come
    faster than ``mininterval`` and does not redraw its text on close, so a saved notebook kept
    "0%" or "91%" beside a full bar; and the cell's text fallback (what a viewer without the
    widget shows) was the bar's repr at creation, ``0%| 0.00/15.5M``. Here the bar is redrawn on
    close and shown through a display handle, updated then, so both read the true end state. The
    class is made once: tqdm starts a monitor thread per bar class and keeps it while the process
    runs, so a class made per bar left one thread behind each load."""
    from IPython.display import display
    from tqdm.notebook import tqdm as notebook_tqdm

    class Bar(notebook_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, display=False, **kwargs)
            self._handle = None if self.disable else display(self.container, display_id=True)

        def close(self):
            if not self.disable and self._handle is not None:
                self.refresh()
                self._handle.update(self.container)
            super().close()

    return Bar


class LoadBar:
    """A ``progress(done, total, name)`` callable for a load, made before the load starts with
    its total. A call only stores its arguments; a thread of its own (started here, in the
    caller's context, so a notebook shows the bar in the cell that started the load) makes the
    bar once the load has run ``delay`` seconds, where ``shown()``, and then draws the latest
    state every ``interval`` seconds. A load shorter than ``delay`` makes no bar at all: one made
    for it would be removed (``leave=False``) before anyone could read it, and a notebook widget
    costs more to make (10-40 ms of Python) than such a load takes. A bar made late counts from
    the load's start (when the ``LoadBar`` was made), so its elapsed time and rate are the load's.
    ``close()`` draws the last state and removes the bar.

    Example:
        >>> bar = LoadBar("load (gpu)", total=1000)
        >>> bar(500, 1000, "blk.0.attn_q.weight")   # what the load's completion thread does
        >>> bar.close()
    """

    def __init__(self, desc: str, total: int, unit: str = "B", interval: float = DRAW_INTERVAL_S,
                 delay: float | None = None):
        delay = SHOW_AFTER_S if delay is None else delay
        if not 0.01 <= interval <= 60:
            raise GGUFLabError(f"progress interval must be from 0.01 to 60 seconds, got {interval!r}")
        if not 0 <= delay <= 3600:
            raise GGUFLabError(f"progress delay must be from 0 to 3600 seconds, got {delay!r}")
        self.desc, self.unit, self.interval, self.delay = desc, unit, interval, delay
        self._since = time.time()  # tqdm's clock at the load's start: the bar's elapsed time and rate count from it
        self.bar = None
        self._state: tuple[int, int, str | None] = (0, total, None)
        self._drawn: tuple | None = None
        self._stop = threading.Event()
        # the caller's context: ipykernel sends a thread's output to the cell its context names
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name="gguf-lab-progress", daemon=True)
        self._thread.start()

    def __call__(self, done: int, total: int, name: str | None = None) -> None:
        self._state = (done, total, name)  # one store: the only cost on the load's thread

    def _run(self) -> None:
        if self._stop.wait(self.delay) or not shown():
            return
        done, total, _ = self._state
        self.bar = progress_bar(self.desc, total, self.unit, done=done, since=self._since)
        self._draw()
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self) -> None:
        state = self._state
        if state == self._drawn:
            return
        self._drawn = state
        done, total, name = state
        if total != self.bar.total:
            self.bar.reset(total=total)  # reset(), not .total =: it also resizes a notebook widget
        if name:
            self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Stop the drawing thread, draw the last state, remove the bar; safe to call twice."""
        self._stop.set()
        self._thread.join()
        if self.bar is not None:
            self._draw()
            self.bar.close()
            self.bar = None


class ProgressBar:
    """A ``progress(done, total, name)`` callback that draws one bar, on the calling thread, for
    work whose total is known only at its first report (``synth``). The bar is made at the first
    call, once the total is known: a bar made without one reads ``0.00B [00:00, ?B/s]`` in text,
    and a notebook widget made without one is drawn full and never moves.

    Example:
        >>> from gguf_gpu_lab.tools.synth import synth
        >>> bar = ProgressBar("synth 4M")
        >>> r = synth(tmp_path / "m.gguf", "4M", progress=bar); bar.close()
    """

    def __init__(self, desc: str, unit: str = "B"):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int, name: str | None = None) -> None:
        if self.bar is None:
            self.bar = progress_bar(self.desc, total, self.unit)
        if self.bar.disable:
            return
        if total != self.bar.total:
            self.bar.reset(total=total)  # reset(), not .total =: it also resizes a notebook widget
        self.bar.update(done - self.bar.n)
        if name:
            self.bar.set_postfix_str(name, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reporter(progress, desc: str, total: int):
    """What a load calls after each chunk for a ``progress=`` argument (checked by
    ``check_progress``): None for None/False, a ``LoadBar`` for True, the callable itself
    otherwise. The caller closes a ``LoadBar``."""
    check_progress(progress)
    if progress is None or progress is False:
        return None
    if progress is True:
        return LoadBar(desc, total)
    return progress
