"""The first minute in a notebook, measured: what a progress bar costs, the first load in a fresh
Jupyter kernel, ``hf.from_gguf``'s first call in a fresh process, and when a warm load's first
copy starts (``gguf-gpu-lab bench --first``).

Each kernel is a fresh one, run through nbclient as a notebook of cells a user would type; each
cell calls a ``Session`` method, which keeps its figures, and the last prints them as JSON:

- first load: ``open_model`` in one cell, a pause in the next (a user looking at the table;
  ``pause_s``), then ``load`` timed from its call to the device synchronized; a second kernel
  does it with no pause (open and load in one cell);
- the kernel's first bar: the first ``progress=True`` load (its call time against a load
  without a bar, and its timeline's largest gap that no span explains);
- bar against no bar: loads alternating, medians of each, on the big file and on a ~20 MB one,
  with the bar as it is (made only once a load has run ``progress.SHOW_AFTER_S``) and made at
  once for every load (its widget's cost during the load);
- the first copy of a warm load: its start on the profile's timeline (CUPTI's copy engine where
  ``cupti-python`` works, else the stream events).

``from_gguf``'s first call runs in a fresh process; transformers' own import (torch,
transformers and the model's classes) is timed apart in another, and ``from_gguf`` with
``hf.LOAD_DURING_IMPORTS`` (the load started before the imports) in a third; the three are run
in interleaved rounds and their medians reported, since one fresh import varies by seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from .bench import bench_model, machine_info

TARGETS = {"bar_overhead_big_pct": 2.0, "bar_overhead_small_ms": 1.0, "first_load_after_pause_s": 0.3,
           "from_gguf_first_over_import_s": 2.0, "first_copy_ms": 5.0}
SMALL_PARAMS = "34M"  # a ~20 MB Q4_K_M file
_MARK = "GGUF-LAB-FIRST "


def largest_gap(df, wall_s: float) -> dict:
    """The longest stretch of the load's wall time that no span covers (any lane), in ms, and
    the spans on either side: a stall nothing on the timeline explains."""
    best = {"gap_ms": 0.0, "after": None, "before": None}
    end, after = 0.0, "start"
    for r in df.sort_values("start_us").itertuples(index=False):
        if r.start_us - end > best["gap_ms"] * 1e3:
            best = {"gap_ms": (r.start_us - end) / 1e3, "after": after, "before": f"{r.lane}: {r.stage}"}
        if r.end_us > end:
            end, after = r.end_us, f"{r.lane}: {r.stage}"
    if wall_s * 1e6 - end > best["gap_ms"] * 1e3:
        best = {"gap_ms": (wall_s * 1e6 - end) / 1e3, "after": after, "before": "end"}
    return best


class Session:
    """The measurements a kernel's cells make, one method a cell; ``report()`` prints them."""

    def __init__(self, path: str, small: str | None, backend: str = "auto"):
        self.path, self.small, self.backend = path, small, backend
        self.res: dict = {"path": os.path.basename(path)}
        self.model = None

    def _sync(self) -> None:
        from ..device import get_backend

        get_backend(self.backend).synchronize()

    def _timed_load(self, model, **kw):
        from .. import load

        t0 = time.perf_counter()
        r = load(model, backend=self.backend, **kw)
        self._sync()
        return r, time.perf_counter() - t0

    def open(self) -> None:
        from .. import open_model

        t0 = time.perf_counter()
        self.model = open_model(self.path)
        self.res["open_s"] = time.perf_counter() - t0

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)  # the kernel idles, as while a user reads the tensor table
        self.res["pause_s"] = seconds

    def first_load(self) -> None:
        from .. import warmup

        r, call_s = self._timed_load(self.model)
        w = warmup.last()
        self.res["first_load"] = {
            "call_s": call_s, "wall_s": r.wall_s, "setup_ms": _setup_ms(r.profile.df),
            "largest_gap": largest_gap(r.profile.df, r.wall_s),
            "warmup": None if w is None else {"steps_s": dict(w.steps), "done": w.done(),
                                              "error": None if w.error is None else repr(w.error)}}

    def first_bar(self) -> None:
        """The kernel's first bar, made at once (``SHOW_AFTER_S = 0``), so that its widget (and on
        a machine without a warm-up, the import of tqdm's notebook module) happens during the load."""
        none, none_s = self._timed_load(self.model)
        del none
        with _bar_delay(0.0):
            r, call_s = self._timed_load(self.model, progress=True)
        self.res["first_bar"] = {"call_s": call_s, "wall_s": r.wall_s, "no_bar_call_s": none_s,
                                 "bar_cost_s": call_s - none_s, "largest_gap": largest_gap(r.profile.df, r.wall_s),
                                 "setup_ms": _setup_ms(r.profile.df)}

    def bar_overhead(self, which: str, repeat: int = 7, drawn: bool = False) -> None:
        """Loads with and without a bar, alternating; medians of the call (to the device
        synchronized) and of the load's own wall time. ``drawn``: the bar made at once however
        short the load (``SHOW_AFTER_S = 0``) rather than after ``SHOW_AFTER_S``."""
        from .. import open_model, progress

        model = self.model if which == "big" else open_model(self.small)
        calls: dict = {False: [], True: []}
        walls: dict = {False: [], True: []}
        with _bar_delay(0.0 if drawn else progress.SHOW_AFTER_S):
            for _ in range(repeat):
                for bar in (False, True):
                    r, s = self._timed_load(model, progress=bar)
                    calls[bar].append(s)
                    walls[bar].append(r.wall_s)
                    del r
        med = {k: statistics.median(v) for k, v in calls.items()}
        row = {"file_bytes": os.path.getsize(model.path), "repeat": repeat,
               "call_s": {"no_bar": med[False], "bar": med[True]},
               "wall_s": {"no_bar": statistics.median(walls[False]), "bar": statistics.median(walls[True])},
               "all_call_s": {"no_bar": calls[False], "bar": calls[True]},
               "overhead_ms": (med[True] - med[False]) * 1e3, "overhead_pct": (med[True] / med[False] - 1) * 100,
               "bar_after_s": progress.SHOW_AFTER_S if not drawn else 0.0}
        self.res[f"bar_{which}{'_drawn' if drawn else ''}"] = row

    def first_copy(self) -> None:
        """A warm load's first host-to-device copy: when it starts on the load's timeline, and
        after how much reading."""
        method = "events"
        try:
            r, _ = self._timed_load(self.model, profile="cupti")
            method = "cupti"
        except Exception as e:  # no cupti-python, not NVIDIA, or the host backend
            self.res["first_copy_cupti_error"] = f"{type(e).__name__}: {e}"[:300]
            r, _ = self._timed_load(self.model)
        df = r.profile.df
        copies = df[df["stage"] == "h2d"]
        reads = df[df["stage"] == "read"]
        self.res["first_copy"] = {
            "method": method, "first_copy_ms": float(copies["start_us"].min()) / 1e3,
            "first_read_start_ms": float(reads["start_us"].min()) / 1e3 if len(reads) else None,
            "first_read_end_ms": float(reads["end_us"].min()) / 1e3 if len(reads) else None,
            "first_read_bytes": int(reads.sort_values("end_us")["bytes"].iloc[0]) if len(reads) else None,
            "queue_first_copy_end_ms": _span_end_ms(df, "queue first copy"),
            "setup_ms": _setup_ms(df), "wall_s": r.wall_s, "largest_gap": largest_gap(df, r.wall_s)}

    def report(self) -> None:
        print(_MARK + json.dumps(self.res))


@contextlib.contextmanager
def _bar_delay(seconds: float):
    from .. import progress

    before, progress.SHOW_AFTER_S = progress.SHOW_AFTER_S, seconds
    try:
        yield
    finally:
        progress.SHOW_AFTER_S = before


def _span_end_ms(df, stage: str) -> float | None:
    """When the first span of ``stage`` ended on the load's timeline, in ms (None: no such span)."""
    s = df[df["stage"] == stage]
    return float(s["end_us"].min()) / 1e3 if len(s) else None


def _setup_ms(df) -> dict:
    s = df[df["lane"] == "setup"]
    return {st: float(g["dur_us"].sum()) / 1e3 for st, g in s.groupby("stage")}


# -- running kernels and processes ------------------------------------------------------------------

def _kernel(cells: list[str], cwd: str, timeout: float) -> dict:
    """Run ``cells`` in a fresh Jupyter kernel (nbclient); the JSON the last one printed."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        raise RuntimeError(f"bench --first runs Jupyter kernels through nbclient ({e}): "
                           "pip install 'gguf-gpu-lab[test]'") from None
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    wall = time.perf_counter() - t0
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                return {"error": f"{o.get('ename')}: {o.get('evalue')}"[:2000], "cell": c.source}
    text = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []))
    line = next((ln for ln in text.splitlines() if ln.startswith(_MARK)), None)
    if line is None:
        return {"error": f"no result printed: {text[-1000:]}"}
    return {**json.loads(line[len(_MARK):]), "kernel_wall_s": wall}


def _session_cells(path: str, small: str | None, backend: str, pause_s: float | None, repeat: int,
                   small_repeat: int) -> list[str]:
    head = (f"import time as _t; _t0 = _t.perf_counter(); import gguf_gpu_lab\n"
            f"from gguf_gpu_lab.tools.bench_first import Session\n"
            f"S = Session({path!r}, {small!r}, {backend!r}); S.res['import_s'] = _t.perf_counter() - _t0")
    if pause_s is None:  # open and load in one cell: no time between them
        return [head, "S.open(); S.first_load()", "S.report()"]
    return [head, "S.open()", f"S.pause({pause_s!r})", "S.first_load()", "S.first_bar()",
            f"S.bar_overhead('big', {repeat})", f"S.bar_overhead('small', {small_repeat})",
            f"S.bar_overhead('big', {repeat}, drawn=True)", f"S.bar_overhead('small', {small_repeat}, drawn=True)",
            "S.first_copy()", "S.report()"]


_FROM_GGUF = r"""
import json, sys, time
t0 = time.perf_counter()
import gguf_gpu_lab as lab
from gguf_gpu_lab import hf
hf.LOAD_DURING_IMPORTS = sys.argv[3] == "1"
t1 = time.perf_counter()
model = hf.from_gguf(sys.argv[1], dtype="float16", device=sys.argv[2])
if sys.argv[2] != "cpu":
    import torch
    torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"import_gguf_gpu_lab_s": t1 - t0, "from_gguf_first_s": t2 - t1, "steps_s": model.gguf_steps_s}))
"""

_IMPORT_TRANSFORMERS = r"""
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import transformers
from transformers import AutoModelForCausalLM, CONFIG_MAPPING
import transformers.modeling_gguf_pytorch_utils
import transformers.models.llama.modeling_llama
t2 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "transformers_s": t2 - t1, "import_s": t2 - t0,
                  "torch": torch.__version__, "transformers": transformers.__version__}))
"""


def _process(code: str, args: list[str], timeout: float) -> dict:
    try:
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _processes(path: str, dev: str, rounds: int, timeout: float) -> dict:
    """``from_gguf``'s first call (imports first, as shipped), the same with the load started
    before the imports, and transformers' import alone, each in fresh processes, interleaved
    (a round runs one of each) so that a slow spell of the machine falls on all three; the
    medians, with every run kept. A run that fails makes the entry an error."""
    kinds = {"transformers_import": (_IMPORT_TRANSFORMERS, []), "from_gguf": (_FROM_GGUF, [path, dev, "0"]),
             "from_gguf_load_during_imports": (_FROM_GGUF, [path, dev, "1"])}
    runs: dict[str, list] = {k: [] for k in kinds}
    for _ in range(max(1, rounds)):
        for k, (code, args) in kinds.items():
            runs[k].append(_process(code, args, timeout))
    out = {}
    for k, rs in runs.items():
        bad = next((r for r in rs if "error" in r), None)
        if bad is not None:
            out[k] = bad
            continue
        key = "import_s" if k == "transformers_import" else "from_gguf_first_s"
        times = [r[key] for r in rs]
        out[k] = {**min(rs, key=lambda r: abs(r[key] - statistics.median(times))), key: statistics.median(times),
                  "runs": rs, "all_" + key: times}
    return out


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("cupy-cuda12x", "cupy-cuda13x", "cupy-rocm-7-0", "torch", "transformers", "tqdm", "ipywidgets",
                 "ipykernel", "nbclient"):
        try:
            out[name] = version(name)
        except Exception:
            pass
    return out


def bench_first(model_path: str | None = None, params: str = "8B", mix: str = "Q4_K_M", backend: str = "auto",
                pause_s: float = 1.0, repeat: int = 7, small_repeat: int = 21, small_params: str = SMALL_PARAMS,
                hf: bool = True, timeout: float = 900, process_repeat: int = 2) -> dict:
    """Every figure of the module docstring on ``model_path`` (default a synthetic llama of
    ``params``) and a synthetic ~20 MB file, page cache warm; targets in ``TARGETS``. The fresh
    processes (``from_gguf``, the same with ``hf.LOAD_DURING_IMPORTS``, transformers' import alone)
    run ``process_repeat`` rounds, one of each a round, and report the medians."""
    from ..device import get_backend

    be = get_backend(backend)
    device = be.info()
    with bench_model(model_path, params, mix) as (path, synth_info), \
            bench_model(None, small_params, mix, arch="llama") as (small, _):
        cwd = os.path.dirname(os.path.abspath(path))
        res = {"benchmark": "first", "machine": machine_info(), "device": device, "versions": _versions(),
               "model": {"path": os.path.basename(path), "file_bytes": os.path.getsize(path), "synth": synth_info},
               "small_model": {"params": small_params, "file_bytes": os.path.getsize(small)},
               "page_cache": "warm", "targets": TARGETS,
               "kernel": _kernel(_session_cells(path, small, backend, pause_s, repeat, small_repeat), cwd, timeout),
               "kernel_no_pause": _kernel(_session_cells(path, small, backend, None, repeat, small_repeat), cwd,
                                          timeout)}
        if hf:
            res.update(_processes(path, "cuda" if be.is_gpu else "cpu", process_repeat, timeout))
        res["meets_targets"] = _verdicts(res)
        return res


def _verdicts(res: dict) -> dict:
    k, t = res["kernel"], TARGETS
    out = {}
    if "bar_big" in k:
        out["bar_overhead_big"] = k["bar_big"]["overhead_pct"] <= t["bar_overhead_big_pct"]
        out["bar_overhead_small"] = k["bar_small"]["overhead_ms"] <= t["bar_overhead_small_ms"]
        out["first_load_after_pause"] = k["first_load"]["call_s"] <= t["first_load_after_pause_s"]
        out["first_copy"] = k["first_copy"]["first_copy_ms"] <= t["first_copy_ms"]
    f, imp = res.get("from_gguf", {}), res.get("transformers_import", {})
    if "from_gguf_first_s" in f and "import_s" in imp:
        out["from_gguf_first"] = f["from_gguf_first_s"] <= t["from_gguf_first_over_import_s"] + imp["import_s"]
    return out


def format_first(res: dict) -> str:
    k, kn = res["kernel"], res["kernel_no_pause"]
    d = res["device"]
    lines = [f"the first minute on {d.get('name')} ({res['machine']['date']}): {res['model']['path']}, "
             f"{res['model']['file_bytes'] / 1e9:.2f} GB; small file {res['small_model']['file_bytes'] / 1e6:.1f} MB"]
    if "error" in k:
        return "\n".join(lines + [f"kernel failed: {k['error']}"])
    fl = k["first_load"]
    lines.append(f"first load in a fresh kernel, {k['pause_s']:.1f} s after open: {fl['call_s']:.3f} s "
                 f"(target <= {TARGETS['first_load_after_pause_s']} s; wall {fl['wall_s']:.3f} s, largest unexplained "
                 f"gap {fl['largest_gap']['gap_ms']:.1f} ms)")
    if "first_load" in kn:
        lines.append(f"  with no pause: {kn['first_load']['call_s']:.3f} s (warm-up {kn['first_load']['warmup']})")
    fb = k["first_bar"]
    lines.append(f"the kernel's first bar: call {fb['call_s'] * 1e3:.1f} ms against {fb['no_bar_call_s'] * 1e3:.1f} ms "
                 f"without (+{fb['bar_cost_s'] * 1e3:.1f} ms); largest unexplained gap "
                 f"{fb['largest_gap']['gap_ms']:.2f} ms")
    for key in ("bar_big", "bar_small", "bar_big_drawn", "bar_small_drawn"):
        b = k[key]
        when = "made at once" if key.endswith("drawn") else f"made after {b['bar_after_s']} s"
        lines.append(f"bar ({when}) vs none, {key.split('_')[1]} file: {b['call_s']['bar'] * 1e3:.2f} ms vs "
                     f"{b['call_s']['no_bar'] * 1e3:.2f} ms = {b['overhead_ms']:+.2f} ms ({b['overhead_pct']:+.2f} %); "
                     f"load wall {b['wall_s']['bar'] * 1e3:.2f} vs {b['wall_s']['no_bar'] * 1e3:.2f} ms")
    fc = k["first_copy"]
    lines.append(f"first copy of a warm load ({fc['method']}): at {fc['first_copy_ms']:.2f} ms "
                 f"(target <= {TARGETS['first_copy_ms']} ms); first read ends at {fc['first_read_end_ms']} ms")
    if fc.get("queue_first_copy_end_ms") is not None:
        lines.append(f"  the first copy queued at {fc['queue_first_copy_end_ms']:.2f} ms; setup spans {fc['setup_ms']}")
    f, imp = res.get("from_gguf", {}), res.get("transformers_import", {})
    if "import_s" in imp:
        lines.append(f"transformers' import alone (torch, transformers, the model's class): median {imp['import_s']:.2f} s "
                     f"of {['%.2f' % x for x in imp['all_import_s']]}")
    elif imp:
        lines.append(f"transformers' import: {imp.get('error', '')[:300]}")
    for key, what in (("from_gguf", "from_gguf first call (imports, then load beside the build)"),
                      ("from_gguf_load_during_imports", "  with the load started before the imports")):
        f = res.get(key, {})
        if "from_gguf_first_s" in f:
            lines.append(f"{what}: median {f['from_gguf_first_s']:.2f} s of {['%.2f' % x for x in f['all_from_gguf_first_s']]}"
                         + (" (target <= import + 2 s)" if key == "from_gguf" else "")
                         + f"; steps {{{', '.join(f'{k}: {v:.2f}' for k, v in f['steps_s'].items())}}}")
        elif f:
            lines.append(f"{key}: {f.get('error', '')[:300]}")
    lines.append(f"meets targets: {res['meets_targets']}")
    return "\n".join(lines)
