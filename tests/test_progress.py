"""Progress bars: one helper for the command line and load(progress=True)."""

import pytest

from gguf_gpu_lab.loader import load
from gguf_gpu_lab.progress import ProgressBar


def test_load_bar_starts_with_its_total_in_decimal_units(small_model, monkeypatch, capsys):
    from tqdm import tqdm

    from gguf_gpu_lab import open_model, progress

    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)  # a bar however short the load
    with open_model(small_model, warmup=False) as m:
        total = sum(t.n_bytes for t in m.tensors)
        load(m, backend="host", progress=True, chunk_mb=0.5)
    err = capsys.readouterr().err
    first = err.split("\r")[1]  # the bar as first drawn
    assert first.startswith("load (gpu):") and f"/{tqdm.format_sizeof(total)} [" in first  # GB/MB, not GiB/MiB
    # stderr is no terminal here (a log): the bar's last state stays, on a line of its own
    last = err.rstrip("\n").split("\r")[-1]
    assert err.endswith("\n") and last.startswith("load (gpu): 100%"), err[-300:]


def test_a_load_shorter_than_the_delay_makes_no_bar(small_model, monkeypatch, capsys):
    from gguf_gpu_lab import progress

    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 30.0)
    made = []
    monkeypatch.setattr(progress, "progress_bar", lambda *a, **k: made.append(a))
    load(small_model, backend="host", progress=True, chunk_mb=0.5)
    assert made == [] and capsys.readouterr().err == ""
    with pytest.raises(Exception, match="delay must be from 0 to 3600"):
        progress.LoadBar("x", 10, delay=-1)


@pytest.mark.parametrize("env", [None, "0"])
def test_no_bar_where_no_one_watches(small_model, monkeypatch, capsys, env):
    if env is None:
        monkeypatch.delenv("GGUF_LAB_PROGRESS", raising=False)  # and stderr is captured: not a terminal
    else:
        monkeypatch.setenv("GGUF_LAB_PROGRESS", env)
    load(small_model, backend="host", progress=True, chunk_mb=0.5)
    assert capsys.readouterr().err == ""


def test_notebook_bar_is_sized_by_its_total(monkeypatch):
    import tqdm.auto
    import tqdm.notebook

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)  # as in a Jupyter kernel with ipywidgets
    monkeypatch.delenv("GGUF_LAB_PROGRESS", raising=False)
    bar = ProgressBar("load (gpu)")
    bar(5, 10, "blk.0.attn_q.weight")
    widget = bar.bar.container.children[1]
    bar.bar.refresh()
    assert (widget.max, widget.value, widget.bar_style) == (10, 5, "")  # not drawn full ("info") from the start
    bar(5, 20)  # a total that changes resizes the widget
    bar.bar.refresh()
    assert (widget.max, widget.value) == (20, 5)
    bar.close()


def test_a_saved_notebook_shows_the_bar_at_its_end(small_model, tmp_path):
    """In a Jupyter kernel, the bar's saved widget state and its text fallback read 100% of the
    load's bytes, not a rate-limited 0% or 91% beside a full bar."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat (the test extra) runs notebooks")
    nbclient = pytest.importorskip("nbclient", reason="nbclient (the test extra) runs notebooks")
    pytest.importorskip("ipywidgets", reason="ipywidgets makes the notebook bar")
    from tqdm import tqdm

    from gguf_gpu_lab import open_model

    with open_model(small_model) as m:
        total = tqdm.format_sizeof(sum(t.n_bytes for t in m.tensors), divisor=1000)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os\nos.environ.pop('GGUF_LAB_PROGRESS', None)\nimport gguf_gpu_lab as lab, gguf_gpu_lab.progress as p\n"
        "p.SHOW_AFTER_S = 0.0  # a bar even for a load this short\n"
        f"r = lab.load({str(small_model)!r}, backend='host', chunk_mb=0.05, progress=True)")])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    (shown,) = [o for o in nb.cells[0].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    fallback = shown["data"]["text/plain"]
    assert "100%" in fallback and f"{total}/{total}" in fallback, fallback
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    texts = [s["state"]["value"] for s in state.values() if s["model_name"] == "HTMLModel" and s["state"].get("value")]
    bars = [s["state"] for s in state.values() if s["model_name"] == "FloatProgressModel"]
    assert bars and all(b["value"] == b["max"] for b in bars)
    assert any("100%" in t for t in texts) and not any(f"{total}/" in t and f"{total}/{total}" not in t for t in texts), texts


# -- progress= of every kind, checked before any work; a bar that cannot delay a chunk ------------

@pytest.mark.parametrize("bad", ["yes", 1, 0, 0.5, [], object()])
def test_progress_of_another_kind_is_refused_before_any_work(tmp_path, bad):
    from gguf_gpu_lab import GGUFLabError

    missing = tmp_path / "not-there.gguf"  # were the file opened first, this would be ModelNotFoundError
    with pytest.raises(GGUFLabError, match=r"progress must be None or False .* True \(a bar\) or a callable"):
        load(missing, backend="host", progress=bad)


@pytest.mark.parametrize("bad", [True, "stop", 1])
def test_cancel_of_another_kind_is_refused_before_any_work(tmp_path, bad):
    from gguf_gpu_lab import GGUFLabError

    with pytest.raises(GGUFLabError, match=r"cancel must be a threading\.Event \(or None\), got "):
        load(tmp_path / "not-there.gguf", backend="host", cancel=bad)


@pytest.mark.parametrize("off", [None, False])
def test_no_progress(small_model, monkeypatch, capsys, off):
    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")  # a bar would be drawn, were one asked for
    r = load(small_model, backend="host", progress=off, chunk_mb=0.5)
    assert len(r) > 0 and capsys.readouterr().err == ""
    assert "progress callback" not in set(r.profile.df["stage"])


def test_a_slow_bar_does_not_delay_the_load(small_model, monkeypatch):
    """A bar whose every draw takes 0.3 s (a stalled notebook front end): the load's completion
    thread only stores the counts, the bar's own thread draws them, so the load ends long before
    a single draw would have; the last state is drawn at close, and it is the total."""
    import threading
    import time

    from gguf_gpu_lab import open_model
    from gguf_gpu_lab.progress import LoadBar

    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")
    drawn, threads = [], set()
    real_draw = LoadBar._draw

    def slow_draw(self):
        threads.add(threading.current_thread().name)
        time.sleep(0.3)
        real_draw(self)
        drawn.append(self._drawn)

    monkeypatch.setattr(LoadBar, "_draw", slow_draw)
    monkeypatch.setattr("gguf_gpu_lab.progress.SHOW_AFTER_S", 0.0)
    with open_model(small_model, warmup=False) as m:
        total = sum(t.n_bytes for t in m.tensors)
        load(m, backend="host", chunk_mb=0.25)  # the process's first load of it: threads and pages ready
        t0 = time.perf_counter()
        r = load(m, backend="host", progress=True, chunk_mb=0.25)
        call_s = time.perf_counter() - t0
    assert r.profile.df["chunk"].max() >= 8  # many chunks: a bar drawn after each would take 8 x 0.3 s
    assert r.wall_s < 0.3 <= call_s  # the load did not wait for a draw; the call waited for the last one
    assert drawn[-1][:2] == (total, total)
    assert threads <= {"gguf-lab-progress", threading.current_thread().name}  # never a loader thread
    assert not any(t.name == "gguf-lab-progress" for t in threading.enumerate())  # joined at close


def test_a_slow_progress_callable_has_a_span(small_model):
    """A callable runs on the completion thread (today's semantics): the time it takes is a span
    of its own on the setup lane, so the timeline shows where the load waited."""
    import time

    calls = []

    def slow(done, total, name):
        calls.append(done)
        time.sleep(0.02)

    r = load(small_model, backend="host", progress=slow, chunk_mb=0.5)
    spans = r.profile.df[r.profile.df["stage"] == "progress callback"]
    assert len(spans) == len(calls) > 1 and (spans["dur_us"] >= 19_000).all()
    assert set(spans["lane"]) == {"setup"}


def test_a_progress_callable_still_cancels(small_model):
    from gguf_gpu_lab import LoadCancelled

    with pytest.raises(LoadCancelled, match="progress callback"):
        load(small_model, backend="host", progress=lambda d, t, n: False, chunk_mb=0.5)


def test_setup_spans_explain_the_host_work_before_the_first_copy(small_model):
    r = load(small_model, backend="host", chunk_mb=0.5)
    setup = set(r.profile.df.loc[r.profile.df["lane"] == "setup", "stage"])
    assert {"plan", "pin staging", "allocate outputs"} <= setup


def test_preload_draws_one_bar_for_all_its_batches(small_model, monkeypatch):
    from gguf_gpu_lab import GGUFLabError, open_model
    from gguf_gpu_lab.progress import LoadBar

    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")
    made, closed = [], []
    real_init, real_close = LoadBar.__init__, LoadBar.close
    monkeypatch.setattr(LoadBar, "__init__", lambda self, *a, **k: (made.append(a), real_init(self, *a, **k))[1])
    monkeypatch.setattr(LoadBar, "close", lambda self: (closed.append(self._state), real_close(self))[1])
    with open_model(small_model, warmup=False) as m:
        total = sum(t.n_bytes for t in m.tensors)
        with pytest.raises(GGUFLabError, match="progress must be"):
            m.preload(backend="host", progress="yes")
        for bad in (0, -5, float("nan"), "1", True):
            with pytest.raises(GGUFLabError, match="batch_mb must be more than 0"):
                m.preload(backend="host", batch_mb=bad)
        m.preload(backend="host", progress=True, batch_mb=0.5).wait()
        assert m.cache_info()["entries"] == len(m)
    assert made == [("preload", total)]  # one bar, made by the caller, batches counted on from each other
    assert closed[0][:2] == (total, total)


def test_in_a_kernel_the_bar_is_a_widget_in_the_cell_that_loads(small_model, tmp_path):
    """In a Jupyter kernel the bar is tqdm's notebook widget, made by the bar's own thread and
    shown in the cell that started the load (not in a later cell, not lost)."""
    nbformat = pytest.importorskip("nbformat")
    NotebookClient = pytest.importorskip("nbclient").NotebookClient
    cells = ["import gguf_gpu_lab as lab, gguf_gpu_lab.progress as p, time\n"
             f"p.SHOW_AFTER_S = 0.0; m = lab.open_model({str(small_model)!r}, warmup=False)",
             "print('nothing shown here')",
             "bar = p.LoadBar('load (gpu)', 100, delay=0.0); bar(50, 100, 't'); time.sleep(0.3); bar.close()",
             "r = lab.load(m, backend='host', progress=True, chunk_mb=0.25); print(len(r))"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors[0].get("evalue")
    widget = "application/vnd.jupyter.widget-view+json"
    shown = [i for i, c in enumerate(nb.cells) for o in c.outputs if widget in o.get("data", {})]
    assert shown[:1] == [2] and set(shown) <= {2, 3}  # the bar of cell 3: made at once, as SHOW_AFTER_S = 0


def test_a_bar_given_to_load_is_the_callers_to_close(small_model):
    """A ``LoadBar`` passed in (as ``hf.from_gguf`` and preload do, made on the caller's thread)
    is left open by the load; only a bar the load made itself is closed by it."""
    from gguf_gpu_lab.progress import LoadBar

    bar = LoadBar("mine", 10)
    load(small_model, backend="host", progress=bar, chunk_mb=0.5)
    assert not bar._stop.is_set() and bar._state[0] == bar._state[1] > 0
    bar.close()
    assert bar._stop.is_set()


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_setup_spans_do_not_nest(small_model, mode):
    """On the host backend each setup span is time of its own: the first chunk's output allocation
    is not also inside "queue first copy", so a sum of setup time counts it once, and the timeline
    draws neither over the other."""
    r = load(small_model, backend="host", mode=mode, chunk_mb=0.5)
    setup = r.profile.df[r.profile.df["lane"] == "setup"].sort_values("start_us")
    assert {"allocate outputs", "queue first copy"} <= set(setup["stage"])
    assert (setup["start_us"].to_numpy()[1:] >= setup["end_us"].to_numpy()[:-1]).all(), setup


def test_a_late_bar_counts_from_the_loads_start(monkeypatch):
    """A bar made SHOW_AFTER_S into a load shows the load's elapsed time and rate, not the bytes
    done so far credited to the bar's first draw."""
    import threading
    import time

    from gguf_gpu_lab.progress import LoadBar

    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")
    rate, total = 100_000, 10_000_000  # a load doing 100 kB/s
    bar = LoadBar("load (gpu)", total, delay=0.2)
    t0, stop = time.time(), threading.Event()

    def work():
        while not stop.wait(0.01):
            bar(int((time.time() - t0) * rate), total, "t")

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.6)
    d = bar.bar.format_dict
    stop.set()
    worker.join()
    bar.close()
    assert d["elapsed"] >= 0.55  # not the 0.4 s since the bar was made
    shown = d["rate"] or d["n"] / d["elapsed"]
    assert 0.7 * rate < shown < 1.3 * rate, shown


def test_notebook_bars_share_one_monitor_thread(monkeypatch):
    import threading

    import tqdm.auto
    import tqdm.notebook

    from gguf_gpu_lab.progress import progress_bar

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)  # as in a Jupyter kernel with ipywidgets
    monkeypatch.setenv("GGUF_LAB_PROGRESS", "1")
    monitors = lambda: sum(t.name == "tqdm_monitor" for t in threading.enumerate())  # noqa: E731
    before = monitors()
    for _ in range(5):
        bar = progress_bar("load (gpu)", 100)
        bar.update(100)
        bar.close()
    assert monitors() - before <= 1
