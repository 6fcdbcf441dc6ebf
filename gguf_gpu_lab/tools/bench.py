"""Benchmarks. Each compares against a baseline measured in the same run and reports ratios."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import socket
import tempfile
import time
from typing import Callable, Sequence

import numpy as np
from gguf import quants as gq

from .. import quant
from ..errors import GGUFLabError
from .verify import gguf_py_dequantizes, mismatches, reference

DEFAULT_CPU_TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K")


def _best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None where it is not installed."""
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return None


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    from .. import __version__

    return {
        "host": socket.gethostname(), "cpu": cpu, "cores": quant.default_threads(),
        "python": platform.python_version(), "numpy": np.__version__, "gguf": package_version("gguf"),
        "gguf_gpu_lab": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_cpu(types: Sequence[str] | None = None, weights: int = 64 << 20, repeat: int = 3,
              threads: int | None = None) -> dict:
    """CPU dequantization to float32, in millions of weights per second: gguf-py on one thread
    (its only mode), this toolkit on one thread and on all cores; results checked bit-exact first."""
    from .synth import random_blocks

    threads = threads or quant.default_threads()
    rows = []
    for name in types or DEFAULT_CPU_TYPES:
        spec = quant.type_spec(name)
        n_blocks = max(1, weights // spec.block_size)
        rng = np.random.Generator(np.random.SFC64(0))
        n = n_blocks * spec.block_size
        # rows of 4096 weights, as in a model: gguf-py's cost depends on the row count
        row = 4096 if n % 4096 == 0 else spec.block_size
        blocks = random_blocks(spec.ggml_type, n_blocks, rng).reshape(n // row, -1)
        timed_ref = gguf_py_dequantizes(spec.ggml_type)  # else: checked against the values, not timed
        ref = reference(blocks, spec.ggml_type)  # the integer types keep their own dtype, as ours do
        ours = quant.dequantize(blocks, spec.ggml_type, threads=threads)
        bad = mismatches(ours, ref).size
        out = np.empty(n, ours.dtype)
        del ours
        t_ref = _best_of(lambda: gq.dequantize(blocks, spec.ggml_type), repeat) if timed_ref else None
        t_1 = _best_of(lambda: quant.dequantize(blocks, spec.ggml_type, threads=1), repeat)
        t_1_out = _best_of(lambda: quant.dequantize(blocks, spec.ggml_type, threads=1, out=out), repeat)
        t_n = _best_of(lambda: quant.dequantize(blocks, spec.ggml_type, threads=threads), repeat)
        t_n_out = _best_of(lambda: quant.dequantize(blocks, spec.ggml_type, threads=threads, out=out), repeat)
        mw = lambda t: n / t / 1e6 if t else None  # noqa: E731
        x = lambda t: t_ref / t if t_ref else None  # noqa: E731  (None: gguf-py has no such type)
        rows.append({
            "type": spec.name, "weights": n, "mismatches": int(bad),
            "gguf_py_1t_mw_s": mw(t_ref), "ours_1t_mw_s": mw(t_1), "ours_1t_into_buffer_mw_s": mw(t_1_out),
            "speedup_1t_into_buffer": x(t_1_out), "ours_all_mw_s": mw(t_n),
            "ours_all_into_buffer_mw_s": mw(t_n_out),
            "speedup_1t": x(t_1), "speedup_all": x(t_n), "speedup_all_into_buffer": x(t_n_out),
        })
    return {"benchmark": "cpu-dequant", "machine": machine_info(), "threads": threads,
            "targets": {"speedup_1t": 2.0, "speedup_all": 10.0}, "results": rows}


def format_cpu(res: dict) -> str:
    m = res["machine"]
    lines = [f"CPU dequantization to float32, {res['threads']} threads, {m['cpu']} ({m['date']})",
             f"{'type':6} {'gguf-py 1t':>11} {'ours 1t':>9} {'x':>6} {'1t buf':>9} {'x':>6} {'ours all':>9} {'x':>6} {'all buf':>9} {'x':>6}  exact"]
    for r in res["results"]:
        c = lambda k, w, p=0: "-".rjust(w) if r[k] is None else f"{r[k]:{w}.{p}f}"  # noqa: E731 (None: no gguf-py)
        lines.append(f"{r['type']:6} {c('gguf_py_1t_mw_s', 11)} {r['ours_1t_mw_s']:9.0f} {c('speedup_1t', 6, 1)} "
                     f"{r['ours_1t_into_buffer_mw_s']:9.0f} {c('speedup_1t_into_buffer', 6, 1)} "
                     f"{r['ours_all_mw_s']:9.0f} {c('speedup_all', 6, 1)} {r['ours_all_into_buffer_mw_s']:9.0f} "
                     f"{c('speedup_all_into_buffer', 6, 1)}  {'yes' if r['mismatches'] == 0 else 'NO'}")
    lines.append("(millions of weights per second; x = ratio to gguf-py's single thread measured in this run; "
                 "'buf' = into a preallocated output, without first-touch page faults; '-': gguf-py does not "
                 "dequantize the type, checked against its values instead)")
    return "\n".join(lines)


def save_result(res: dict, out_dir: str, kind: str) -> str:
    """Write a result as ``KIND-YYYY-MM-DDTHHMMSS-HOST.json`` (the run's UTC date and time) in
    ``out_dir``, HOST being the machine's ``kind`` where the result names one (the GPUs it ran on,
    e.g. ``h200x2``), else its host name; never over an existing file: a name taken gets ``-2``,
    ``-3``... Returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = res["machine"]["date"][:19].replace(":", "")  # 2026-12-03T184501: a second run that day keeps its own
    stem = os.path.join(out_dir, f"{kind}-{stamp}-{res['machine'].get('kind') or res['machine']['host']}")
    for n in range(1, 1000):
        path = f"{stem}.json" if n == 1 else f"{stem}-{n}.json"
        try:
            f = open(path, "x")  # created here or refused: another run's file is never replaced
        except FileExistsError:
            continue
        with f:
            json.dump(res, f, indent=2)
        return path
    raise GGUFLabError(f"{stem}.json: that name and 998 numbered ones are taken in {out_dir}")


@contextlib.contextmanager
def bench_model(model_path: str | None, params: str, mix: str, **synth_options):
    """A benchmark's model with a warm page cache (as after a download or a previous run):
    ``model_path`` as given, or a synthetic model of ``params`` and ``mix`` written to a temporary
    folder that goes when the benchmark ends. Yields (path, what synth wrote or None)."""
    with contextlib.ExitStack() as stack:
        info = None
        if model_path is None:
            from .synth import synth

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gguf-lab-bench-"))
            name = "-".join(["synthetic", *([synth_options["arch"]] if "arch" in synth_options else []), params, mix])
            model_path = os.path.join(tmp, name + ".gguf")
            s = synth(model_path, params, mix, **synth_options)
            info = {"params": params, "mix": mix, "seconds": s.seconds}
        with open(model_path, "rb") as f:
            while f.read(64 << 20):
                pass
        yield model_path, info
