"""What a user waits for: opening a file (any machine), and open + load + synchronize end to end
on the GPU, first (a fresh process) and steady (the same process again), against transformers'
``from_pretrained(gguf_file=...)`` on the same file in the same run.

Each fresh process is a child (``python -m gguf_gpu_lab.tools.bench_e2e --child ...``) that reports
its own phases: interpreter start, imports, CUDA context creation, then open, load and
synchronize. Process start and context creation are reported apart from the end-to-end figure.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .bench import bench_model, machine_info


def _median(xs):
    return statistics.median(xs) if xs else None


# -- opening (any machine) -----------------------------------------------------------------------

def _time_open(path: str, repeat: int) -> list[float]:
    from ..model import open_model

    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        m = open_model(path, warmup=False)
        out.append(time.perf_counter() - t0)
        m.close()
    return out


def _time_gguf_reader(path: str) -> float:
    import gguf

    t0 = time.perf_counter()
    gguf.GGUFReader(path)
    return time.perf_counter() - t0


_OPEN_CASES = [("vocab-262144", dict(params="25M", mix="Q4_0", vocab=262144), 0.1),  # (name, synth, target s)
               ("8B-Q4_K_M-header", dict(params="8B", mix="Q4_K_M", data=False), 0.05)]


def bench_open(out_dir: str | None = None, repeat: int = 7, reader: bool = True) -> dict:
    """``open_model`` on a 262,144-token vocabulary (tokens, scores and token types) and on the 8B
    synthetic's header, with gguf-py's ``GGUFReader`` on the same files once for comparison.
    The 8B file is written header-only (its tensor data a hole in a sparse file): opening reads no
    tensor data, so the figure is the same as for the full file."""
    from .synth import synth

    tmp = tempfile.mkdtemp(prefix="gguf-lab-open-", dir=out_dir)
    rows = []
    try:
        for name, kw, target in _OPEN_CASES:
            path = os.path.join(tmp, f"{name}.gguf")
            s = synth(path, **kw)
            times = _time_open(path, repeat)
            from ..model import open_model

            with open_model(path, warmup=False) as m:
                t0 = time.perf_counter()
                tokens = m.metadata_value("tokenizer.ggml.tokens")
                decode_s = time.perf_counter() - t0
                n_tensors = len(m.tensors)
            row = {"file": name, "file_bytes": os.path.getsize(path), "vocab": len(tokens), "tensors": n_tensors,
                   "sparse": not kw.get("data", True), "open_s_first": times[0], "open_s_median": _median(times),
                   "open_s_all": times, "decode_all_tokens_s": decode_s, "target_s": target,
                   "gguf_reader_s": _time_gguf_reader(path) if reader else None, "synth_s": s.seconds}
            if row["gguf_reader_s"]:
                row["speedup_vs_gguf_reader"] = row["gguf_reader_s"] / row["open_s_median"]
            rows.append(row)
    finally:
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    return {"benchmark": "open", "machine": machine_info(), "repeat": repeat, "results": rows}


def format_open(res: dict) -> str:
    m = res["machine"]
    lines = [f"open_model on {m['cores']} cores, {m['cpu']} ({m['date']})",
             f"{'file':18} {'vocab':>7} {'tensors':>7} {'first':>8} {'median':>8} {'target':>7} {'GGUFReader':>11} {'x':>7}"]
    for r in res["results"]:
        gr = r.get("gguf_reader_s")
        reader = f"{gr:9.2f} s" if gr else "-"
        speedup = f"{r['speedup_vs_gguf_reader']:6.0f}x" if gr else ""
        lines.append(f"{r['file']:18} {r['vocab']:7d} {r['tensors']:7d} {r['open_s_first'] * 1e3:6.1f}ms "
                     f"{r['open_s_median'] * 1e3:6.1f}ms {r['target_s'] * 1e3:5.0f}ms {reader:>11} {speedup:>7}")
    return "\n".join(lines)


# -- end to end on the GPU -------------------------------------------------------------------------

def _child(path: str, mode: str, dtype: str, repeat: int) -> dict:
    """Runs in a fresh process: phases of the first open + load + synchronize, then ``repeat - 1``
    more in the same process (each reopening the file and dropping the previous result)."""
    t_enter = time.time()
    import cupy

    import gguf_gpu_lab  # noqa: F401
    from gguf_gpu_lab.device import get_backend
    from gguf_gpu_lab.loader import load
    from gguf_gpu_lab.model import open_model

    t_import = time.time()
    cupy.cuda.runtime.free(0)  # creates the CUDA context
    be = get_backend("cupy")
    t_ctx = time.time()
    runs = []
    for i in range(repeat):
        t0 = time.perf_counter()
        m = open_model(path)
        t1 = time.perf_counter()
        r = load(m, mode=mode, dtype=dtype)
        t2 = time.perf_counter()
        be.synchronize()
        t3 = time.perf_counter()
        setup = {}
        if r.profile is not None:
            df = r.profile.df
            s = df[df["lane"] == "setup"]
            setup = {st: float(g["dur_us"].sum()) / 1e6 for st, g in s.groupby("stage")}
        runs.append({"open_s": t1 - t0, "load_call_s": t2 - t1, "sync_s": t3 - t2, "total_s": t3 - t0,
                     "load_wall_s": r.wall_s, "setup_s": setup, "file_bytes": r.file_bytes, "out_bytes": r.out_bytes})
        del r
        m.close()
    return {"t_enter": t_enter, "import_s": t_import - t_enter, "context_s": t_ctx - t_import, "runs": runs}


def _spawn(args: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    t_spawn = time.time()
    p = subprocess.run([sys.executable, "-m", "gguf_gpu_lab.tools.bench_e2e", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    if "t_enter" in doc:
        doc["process_start_s"] = doc.pop("t_enter") - t_spawn
    doc["process_wall_s"] = time.time() - t_spawn
    return doc


_TRANSFORMERS_CHILD = r"""
import json, os, sys, time
t_enter = time.time()
import torch, transformers, gguf
from transformers import AutoModelForCausalLM
import transformers.modeling_gguf_pytorch_utils as mgp
t_import = time.time()
torch.zeros(1, device="cuda")
t_ctx = time.time()
acc = {"gguf_checkpoint_s": 0.0, "gguf_dequantize_s": 0.0, "gguf_reader_s": 0.0}
def timed(fn, key):
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t
    return w
mgp.load_gguf_checkpoint = timed(mgp.load_gguf_checkpoint, "gguf_checkpoint_s")
for mod in (gguf, gguf.quants, mgp):
    if hasattr(mod, "dequantize"):
        setattr(mod, "dequantize", timed(getattr(mod, "dequantize"), "gguf_dequantize_s"))
    if hasattr(mod, "GGUFReader"):
        setattr(mod, "GGUFReader", timed(getattr(mod, "GGUFReader"), "gguf_reader_s"))
path = sys.argv[1]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float16, device_map="cuda", use_kernels=False)
torch.cuda.synchronize()
t1 = time.perf_counter()
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"t_enter": t_enter, "import_s": t_import - t_enter, "context_s": t_ctx - t_import,
                  "from_pretrained_s": t1 - t0, "parameters": n, "transformers": transformers.__version__,
                  "torch": torch.__version__, **acc}))
"""


def _transformers(path: str, timeout: float) -> dict:
    try:
        import importlib.util

        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return {"skipped": "torch or transformers is not installed"}
    except Exception as e:  # pragma: no cover
        return {"skipped": str(e)}
    t_spawn = time.time()
    try:
        p = subprocess.run([sys.executable, "-c", _TRANSFORMERS_CHILD, path], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    doc["process_start_s"] = doc.pop("t_enter") - t_spawn
    return doc


def bench_e2e(model_path: str | None = None, params: str = "8B", mix: str = "Q4_K_M", modes=("gpu", "raw"),
              dtype: str = "float16", processes: int = 3, repeat: int = 6, transformers: bool = True,
              transformers_timeout: float = 400) -> dict:
    """Open + load + synchronize in fresh processes (first) and again in each (steady), per mode;
    the first load with an empty kernel cache apart; transformers on the same file, once."""
    from .bench_gpu import device_info
    from .bench_load import pinned_h2d_peak

    with bench_model(model_path, params, mix) as (model_path, synth_info):
        res = {"benchmark": "e2e", "machine": machine_info(), "device": device_info(),
               "model": {"path": os.path.basename(model_path), "file_bytes": os.path.getsize(model_path),
                         "synth": synth_info},
               "scope": "open_model + load + synchronize; process start, imports and CUDA context apart",
               "page_cache": "warm", "pinned_h2d_gb_s": pinned_h2d_peak(), "modes": {},
               "targets": {"steady_s": 0.2, "first_s": 0.5, "first_over_steady": 2.0, "vs_transformers": 200}}
        for mode in modes:
            row: dict = {}
            with tempfile.TemporaryDirectory() as kc:  # an empty kernel cache: NVRTC compiles
                row["cold_kernel_cache"] = _spawn(["--child", model_path, mode, dtype, "1"],
                                                  env={"GGUF_LAB_KERNEL_CACHE": kc})
            # fills the default kernel cache, as any earlier use of the toolkit on this machine has
            row["warmup"] = _spawn(["--child", model_path, mode, dtype, "1"])
            procs = [_spawn(["--child", model_path, mode, dtype, str(repeat)]) for _ in range(processes)]
            row["processes"] = procs
            ok = [p for p in procs if "runs" in p]
            firsts = [p["runs"][0]["total_s"] for p in ok]
            steady = [r["total_s"] for p in ok for r in p["runs"][1:]]
            row["first_s"] = _median(firsts)
            row["steady_s"] = _median(steady)
            row["steady_best_s"] = min(steady) if steady else None
            row["first_over_steady"] = row["first_s"] / row["steady_s"] if firsts and steady else None
            row["open_s_steady"] = _median([r["open_s"] for p in ok for r in p["runs"][1:]])
            row["import_s"] = _median([p["import_s"] for p in ok])
            row["context_s"] = _median([p["context_s"] for p in ok])
            row["process_start_s"] = _median([p["process_start_s"] for p in ok])
            cold = row["cold_kernel_cache"]
            row["first_cold_kernel_cache_s"] = cold["runs"][0]["total_s"] if "runs" in cold else None
            res["modes"][mode] = row
        res["transformers"] = _transformers(model_path, transformers_timeout) if transformers else {"skipped": "off"}
        t = res["transformers"].get("from_pretrained_s")
        for row in res["modes"].values():
            if t and row.get("steady_s"):
                row["speedup_vs_transformers_steady"] = t / row["steady_s"]
                row["speedup_vs_transformers_first"] = t / row["first_s"]
        return res


def format_e2e(res: dict) -> str:
    d = res["device"]
    lines = [f"end to end on {d.get('name')} ({res['machine']['date']}): {res['model']['path']}, "
             f"{res['model']['file_bytes'] / 1e9:.2f} GB, page cache warm; pinned H2D {res['pinned_h2d_gb_s']:.1f} GB/s",
             f"{'mode':5} {'first':>8} {'steady':>8} {'first/steady':>12} {'cold kernels':>12} {'open':>8} "
             f"{'import':>7} {'context':>8} {'x transformers':>15}"]
    for mode, r in res["modes"].items():
        f = lambda v, unit=" s": "-" if v is None else f"{v:.3f}{unit}"  # noqa: E731
        x = r.get("speedup_vs_transformers_steady")
        lines.append(f"{mode:5} {f(r['first_s']):>8} {f(r['steady_s']):>8} {f(r['first_over_steady'], ''):>12} "
                     f"{f(r['first_cold_kernel_cache_s']):>12} {f(r['open_s_steady']):>8} {f(r['import_s']):>7} "
                     f"{f(r['context_s']):>8} {('-' if x is None else f'{x:.0f}x'):>15}")
    t = res["transformers"]
    if "from_pretrained_s" in t:
        lines.append(f"transformers {t['transformers']} from_pretrained(gguf_file=..., float16, cuda): "
                     f"{t['from_pretrained_s']:.1f} s (GGUF checkpoint code {t['gguf_checkpoint_s']:.1f} s, "
                     f"gguf-py dequantize {t['gguf_dequantize_s']:.1f} s, GGUFReader {t['gguf_reader_s']:.1f} s)")
    else:
        lines.append(f"transformers: {t.get('skipped') or t.get('error', '')[:300]}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        path, mode, dtype, repeat = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        print(json.dumps(_child(path, mode, dtype, repeat)))
