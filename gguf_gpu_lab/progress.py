"""Progress bars for the command line and ``load(progress=True)``: tqdm (an ipywidgets bar in
notebooks), decimal units like the summaries (kB, MB, GB), and shown only where someone can
watch them: a terminal, a notebook, or ``GGUF_LAB_PROGRESS=1`` (``0`` hides them everywhere)."""

from __future__ import annotations

import os
import sys


def shown() -> bool:
    """Whether bars are drawn: a terminal on stderr or a notebook, unless GGUF_LAB_PROGRESS says
    otherwise. A log file would only collect carriage-return fragments."""
    forced = os.environ.get("GGUF_LAB_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    from tqdm.auto import tqdm

    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    return notebook or sys.stderr.isatty()


def progress_bar(desc: str, total: int | None = None, unit: str = "B"):
    """A tqdm bar that removes itself when closed; disabled where ``shown()`` is False.

    Example:
        >>> bar = progress_bar("fuzz", total=100, unit="case")
        >>> bar.update(1); bar.close()
    """
    from tqdm.auto import tqdm

    show = shown()
    if show and _in_notebook(tqdm):
        tqdm = _notebook_bar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1000, leave=False, disable=not show)


def _in_notebook(tqdm_class) -> bool:
    return any(c.__module__ == "tqdm.notebook" for c in tqdm_class.__mro__)


def _notebook_bar():
    """tqdm's notebook bar, drawn at its end state when closed. tqdm skips updates that come
    faster than ``mininterval`` and does not redraw its text on close, so a saved notebook kept
    "0%" or "91%" beside a full bar; and the cell's text fallback (what a viewer without the
    widget shows) was the bar's repr at creation, ``0%| 0.00/15.5M``. Here the bar is redrawn on
    close and shown through a display handle, updated then, so both read the true end state."""
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


class ProgressBar:
    """A ``progress(done, total, name)`` callback that draws one bar. The bar is made at the first
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
