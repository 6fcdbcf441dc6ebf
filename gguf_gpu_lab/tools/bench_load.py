"""The loader benchmark: every mode on one model, against the peaks measured in the same run
(pinned host-to-device copy, parallel file read) and the naive path a user would write."""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .bench import machine_info
from ..model import open_model


def _median(xs: list[float]) -> float:
    """The middle value (the upper middle of an even count), as the results always reported."""
    return sorted(xs)[len(xs) // 2]


def _free_gpu():
    import cupy as cp

    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()


def pinned_buffers(nbytes: int, device: int = 0):
    """An exact-size pinned host buffer (filled, so its pages exist) and a device buffer of
    ``nbytes`` on ``device``: (the pinned memory, keeping it alive; the host array; the device array)."""
    import cupy as cp

    with cp.cuda.Device(device):
        mem = cp.cuda.PinnedMemory(nbytes)
        host = np.frombuffer(cp.cuda.PinnedMemoryPointer(mem, 0), np.uint8, nbytes)
        host[:] = 1
        dev = cp.empty(nbytes, cp.uint8)
    return mem, host, dev


def pinned_h2d_peak(nbytes: int = 1 << 30, chunk: int = 64 << 20, streams: int = 1, repeat: int = 3) -> float:
    """GB/s of host-to-device copies from one exact-size pinned buffer, ``chunk`` bytes a copy."""
    import cupy as cp

    mem, host, dev = pinned_buffers(nbytes)
    ss = [cp.cuda.Stream(non_blocking=True) for _ in range(streams)]
    rt = cp.cuda.runtime
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i, off in enumerate(range(0, nbytes, chunk)):
            n = min(chunk, nbytes - off)
            rt.memcpyAsync(dev.data.ptr + off, host.ctypes.data + off, n, rt.memcpyHostToDevice, ss[i % streams].ptr)
        for s in ss:
            s.synchronize()
        best = min(best, time.perf_counter() - start)
    del dev
    return nbytes / best / 1e9


def parallel_read(path: str, threads: int, chunk: int = 16 << 20) -> float:
    """GB/s of reading the whole file (page cache warm) with ``threads`` preadv readers."""
    size = os.path.getsize(path)
    offs = list(range(0, size, chunk))

    def work(idx):
        fd = os.open(path, os.O_RDONLY)
        buf = bytearray(chunk)
        view = memoryview(buf)
        try:
            for i in idx:
                os.preadv(fd, [view[:min(chunk, size - offs[i])]], offs[i])
        finally:
            os.close(fd)

    parts = [list(range(k, len(offs), threads)) for k in range(threads)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, parts))
    return size / (time.perf_counter() - t0) / 1e9


def mmap_copy(path: str, threads: int, chunk: int = 16 << 20) -> float:
    """GB/s of copying the whole file out of its mapping (page cache warm) with ``threads`` threads."""
    mm = np.memmap(path, mode="r")
    size = mm.size
    offs = list(range(0, size, chunk))

    def work(idx):
        buf = np.empty(chunk, np.uint8)
        for i in idx:
            n = min(chunk, size - offs[i])
            np.copyto(buf[:n], mm[offs[i]:offs[i] + n])

    parts = [list(range(k, len(offs), threads)) for k in range(threads)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, parts))
    dt = time.perf_counter() - t0
    return size / dt / 1e9


@contextlib.contextmanager
def copying(path: str, threads: int, chunk: int = 16 << 20):
    """``threads`` threads copying the file out of its mapping (page cache warm) over and over,
    as the loader's readers do, for as long as the context lasts; yields a function giving the
    bytes copied so far."""
    mm = np.memmap(path, mode="r")
    stop = threading.Event()
    copied = [0] * threads

    def worker(k):
        buf = np.empty(chunk, np.uint8)
        off = k * chunk
        while not stop.is_set():
            if off + chunk > mm.size:
                off = k * chunk % max(1, mm.size - chunk)
            np.copyto(buf, mm[off:off + chunk])
            copied[k] += chunk
            off += threads * chunk

    ths = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for th in ths:
        th.start()
    try:
        time.sleep(0.05)
        yield lambda: sum(copied)
    finally:
        stop.set()
        for th in ths:
            th.join()


def concurrent_ceiling(path: str, threads: int, nbytes: int = 1 << 30, chunk: int = 16 << 20) -> dict:
    """Pinned host-to-device copies while ``threads`` threads copy the file out of its mapping,
    both at once, as the loader runs them: the host memory both use is shared, so this (not each
    peak alone) is the ceiling of a staged load. GB/s of each."""
    import cupy as cp

    mem, host, dev = pinned_buffers(nbytes)
    s = cp.cuda.Stream(non_blocking=True)
    rt = cp.cuda.runtime
    with copying(path, threads, chunk) as copied:
        c0, t0 = copied(), time.perf_counter()
        for _ in range(3):
            for off in range(0, nbytes, 64 << 20):
                rt.memcpyAsync(dev.data.ptr + off, host.ctypes.data + off, min(64 << 20, nbytes - off),
                               rt.memcpyHostToDevice, s.ptr)
        s.synchronize()
        dt = time.perf_counter() - t0
        c1 = copied()
    del dev
    return {"threads": threads, "h2d_gb_s": 3 * nbytes / dt / 1e9, "copy_gb_s": (c1 - c0) / dt / 1e9}


def profiler_overhead(m, repeats: int = 9) -> dict:
    """The profiler's cost on gpu-mode loads of ``m``: load() calls with and without it,
    interleaved; the median of each. Recording during the load is the overhead the load pays;
    turning events into the DataFrame happens on first use of ``profile.df`` and is timed apart."""
    from ..loader import load

    calls: dict[bool, list[float]] = {True: [], False: []}
    first_use = []
    for _ in range(repeats):
        for prof in (True, False):
            t0 = time.perf_counter()
            r = load(m, mode="gpu", dtype="float16", backend="cupy", profile=prof)
            calls[prof].append(time.perf_counter() - t0)
            if prof:
                t1 = time.perf_counter()
                n = len(r.profile.df)
                first_use.append(time.perf_counter() - t1)
            del r
            gc.collect()
    med = {k: _median(v) for k, v in calls.items()}
    first_df = _median(first_use)
    return {"load_overhead": med[True] / med[False] - 1.0, "median_call_s": {"on": med[True], "off": med[False]},
            "calls_s": {"on": calls[True], "off": calls[False]}, "spans": n,
            "first_df_s": first_df, "with_first_df_overhead": (med[True] + first_df) / med[False] - 1.0}


def naive_path(model, names) -> tuple[float, int]:
    """gguf-py's dequantize per tensor, then cupy.asarray: (seconds, file bytes)."""
    import cupy as cp
    from gguf import quants as gq

    t0 = time.perf_counter()
    nbytes = 0
    for n in names:
        t = model.info(n)
        x = gq.dequantize(model.raw(n).reshape(t.np_shape[:-1] + (-1,)) if len(t.np_shape) > 1 else model.raw(n), t.ggml_type)
        cp.asarray(x.astype(np.float16))
        nbytes += t.n_bytes
    cp.cuda.Device().synchronize()
    return time.perf_counter() - t0, nbytes


def bench_load(model_path: str | None = None, params: str = "8B", mix: str = "Q4_K_M", quick: bool = False) -> dict:
    from .bench_gpu import device_info
    from ..loader import default_readers, load
    from .synth import synth

    tmp = None
    if model_path is None:
        tmp = tempfile.mkdtemp(prefix="gguf-lab-bench-")
        model_path = os.path.join(tmp, f"synthetic-{params}-{mix}.gguf")
        s = synth(model_path, params, mix)
        synth_info = {"params": params, "mix": mix, "seconds": s.seconds, "mb_s": s.mb_per_s}
    else:
        synth_info = None
    try:
        size = os.path.getsize(model_path)
        read = {t: parallel_read(model_path, t) for t in (1, 4, 16)}  # also warms the page cache
        mcopy = {t: mmap_copy(model_path, t) for t in (1, 4, 14, 16)}
        peak = pinned_h2d_peak()
        peak4 = pinned_h2d_peak(streams=4)
        ceiling = concurrent_ceiling(model_path, default_readers())
        res = {"benchmark": "load", "machine": machine_info(), "device": device_info(), "model": {
            "path": os.path.basename(model_path), "file_bytes": size, "synth": synth_info},
            "defaults": {"readers": default_readers(), "chunk_mb": 16.0, "streams": 4},
            "peaks": {"pinned_h2d_gb_s": peak, "pinned_h2d_4streams_gb_s": peak4,
                      "read_gb_s": {str(k): v for k, v in read.items()},
                      "mmap_copy_gb_s": {str(k): v for k, v in mcopy.items()},
                      "concurrent": ceiling}}
        modes = {}
        with open_model(model_path) as m:
            tensor_bytes = sum(t.n_bytes for t in m.tensors)
            # the first full load pays for the device pool's and the staging ring's allocations;
            # the figures after it are warm loads (memory reused, as in a process that loads often)
            r = load(m, mode="gpu", dtype="float16", backend="cupy")
            cold = {"wall_s": r.wall_s, "gb_s": r.gb_s, "ratio_to_pinned_peak": r.gb_s / peak}
            del r
            gc.collect()
            for mode in ("gpu", "raw", "cpu", "sequential"):
                if quick and mode in ("cpu", "sequential"):
                    continue
                walls, extra = [], {}
                for rep in range(5 if mode in ("gpu", "raw") else 1):
                    r = load(m, mode=mode, dtype="float16", backend="cupy")
                    walls.append(r.wall_s)
                    extra.update({"file_bytes": r.file_bytes, "out_bytes": r.out_bytes})
                    if mode == "gpu" and rep == 0:
                        extra["stages"] = r.profile.stage_summary().to_dict(orient="records")
                        extra["overlap"] = r.profile.overlap()
                    del r
                    gc.collect()
                best, med = min(walls), _median(walls)
                modes[mode] = {"wall_s": best, "median_wall_s": med, "walls": walls,
                               "gb_s": extra["file_bytes"] / best / 1e9, "median_gb_s": extra["file_bytes"] / med / 1e9,
                               "ratio_to_pinned_peak": extra["file_bytes"] / best / 1e9 / peak, **extra}
            overhead = profiler_overhead(m)
            # the naive path, on a subset (it is slow): the first layers' tensors
            subset = [t.name for t in m.tensors if t.layer is not None and t.layer < 2]
            naive_s, naive_bytes = naive_path(m, subset)
            gc.collect()
            naive_gb_s = naive_bytes / naive_s / 1e9
            sweep = []
            configs = ([(s, 16.0, None, "mmap") for s in (1, 2, 4, 8)] + [(4, c, None, "mmap") for c in (8.0, 32.0, 64.0)]
                       + [(4, 16.0, r, "mmap") for r in (4, 8, 12, 16)] + [(4, 16.0, None, "preadv")])
            for streams, chunk, readers, how in configs:
                ws = []
                for _ in range(3):
                    r = load(m, mode="gpu", dtype="float16", backend="cupy", streams=streams, chunk_mb=chunk,
                             readers=readers, read=how, profile=False)
                    ws.append(r.wall_s)
                    del r
                    gc.collect()
                best = min(ws)
                sweep.append({"streams": streams, "chunk_mb": chunk, "readers": readers or default_readers(), "read": how,
                              "wall_s": best, "median_wall_s": _median(ws), "gb_s": tensor_bytes / best / 1e9,
                              "ratio_to_pinned_peak": tensor_bytes / best / 1e9 / peak})
        _free_gpu()
        res.update({"tensor_bytes": tensor_bytes, "cold_gpu_load": cold, "modes": modes, "profiler_overhead": overhead["load_overhead"],
                    "profiler": overhead,
                    "naive": {"tensors": len(subset), "file_bytes": naive_bytes, "seconds": naive_s, "gb_s": naive_gb_s},
                    "gpu_vs_naive": modes["gpu"]["gb_s"] / naive_gb_s, "sweep": sweep,
                    "hostregister": hostregister_experiment(model_path)})
        return res
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def hostregister_experiment(path: str, nbytes: int = 1 << 30) -> dict:
    """Zero-staging: register the file mapping with cudaHostRegister (read-only) and copy from it
    directly. Measured here to decide whether the loader should use it."""
    import mmap

    import cupy as cp

    rt = cp.cuda.runtime
    if rt.is_hip:
        return {"supported": False, "why": "CuPy's ROCm build stubs hostRegister out"}
    size = min(nbytes, os.path.getsize(path)) & ~0xFFF
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        arr = np.frombuffer(mm, np.uint8)
        ptr = arr.ctypes.data
        dev = cp.empty(size, cp.uint8)
        t0 = time.perf_counter()
        try:
            rt.hostRegister(ptr, size, 8)  # cudaHostRegisterReadOnly
        except Exception as e:
            return {"supported": False, "why": f"{type(e).__name__}: {e}"}
        t_reg = time.perf_counter() - t0
        try:
            s = cp.cuda.Stream(non_blocking=True)
            t1 = time.perf_counter()
            for off in range(0, size, 64 << 20):
                n = min(64 << 20, size - off)
                rt.memcpyAsync(dev.data.ptr + off, ptr + off, n, rt.memcpyHostToDevice, s.ptr)
            s.synchronize()
            t_copy = time.perf_counter() - t1
        finally:
            rt.hostUnregister(ptr)
        # registration spread over threads (64 MiB windows): the rate a pipelined zero-staging
        # path could at best feed the copy engine at
        win, threads = 64 << 20, 8
        offs = list(range(0, size - win + 1, win))
        t2 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda o: rt.hostRegister(ptr + o, win, 8), offs))
        t_par = time.perf_counter() - t2
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda o: rt.hostUnregister(ptr + o), offs))
        del arr
        return {"supported": True, "bytes": size, "register_s": t_reg, "copy_gb_s": size / t_copy / 1e9,
                "end_to_end_gb_s": size / (t_reg + t_copy) / 1e9, "parallel_threads": threads,
                "parallel_register_gb_s": len(offs) * win / t_par / 1e9}
    finally:
        try:
            mm.close()
        except BufferError:
            pass


def format_load(res: dict) -> str:
    p = res["peaks"]
    lines = [f"load benchmark on {res['device']['name']}, {res['machine']['cores']} cores, {res['machine']['date']}",
             f"model: {res['model']['path']}, {res['model']['file_bytes'] / 2**30:.2f} GiB",
             f"peaks: pinned H2D {p['pinned_h2d_gb_s']:.1f} GB/s (4 streams {p['pinned_h2d_4streams_gb_s']:.1f}); "
             "file read (preadv) " + ", ".join(f"{k} thr {v:.1f}" for k, v in p["read_gb_s"].items()) + " GB/s; "
             "copy out of the mapping " + ", ".join(f"{k} thr {v:.1f}" for k, v in p["mmap_copy_gb_s"].items()) + " GB/s",
             (f"both at once ({p['concurrent']['threads']} copy threads): H2D {p['concurrent']['h2d_gb_s']:.1f} GB/s "
              f"while the copies run at {p['concurrent']['copy_gb_s']:.1f} GB/s" if "concurrent" in p else "both at once: not measured"),
             f"{'mode':11} {'best s':>7} {'GB/s':>6} {'x H2D peak':>10} {'median s':>9}"]
    c = res.get("cold_gpu_load")
    if c:
        lines.append(f"{'gpu (first)':11} {c['wall_s']:7.3f} {c['gb_s']:6.2f} {c['ratio_to_pinned_peak']:10.2f}")
    for mode, r in res["modes"].items():
        lines.append(f"{mode:11} {r['wall_s']:7.3f} {r['gb_s']:6.2f} {r['ratio_to_pinned_peak']:10.2f} "
                     f"{r.get('median_wall_s', float('nan')):9.3f}")
    n = res["naive"]
    lines.append(f"naive (gguf-py + cupy.asarray, {n['tensors']} tensors): {n['gb_s']:.3f} GB/s; gpu mode is "
                 f"{res['gpu_vs_naive']:.0f}x faster")
    po = res.get("profiler")
    if po:
        lines.append(f"profiler overhead: {100 * po['load_overhead']:+.1f}% of a gpu-mode load() call (medians); building "
                     f"the DataFrame of its {po['spans']} spans on first use {1e3 * po['first_df_s']:.1f} ms more "
                     f"({100 * po['with_first_df_overhead']:+.1f}% in all)")
    else:  # results written before the first use of profile.df was timed apart
        lines.append(f"profiler overhead: {100 * res['profiler_overhead']:+.1f}% of a gpu-mode load() call, "
                     "including the first profile.df")
    lines.append("sweep (gpu mode): streams chunk_mb readers read -> GB/s")
    for s in res["sweep"]:
        lines.append(f"  {s['streams']:2d} {s['chunk_mb']:6.1f} {s['readers']:3d} {s['read']:6} -> {s['gb_s']:6.2f} "
                     f"({s['ratio_to_pinned_peak']:.2f}x peak)")
    hr = res["hostregister"]
    if not hr.get("supported"):
        lines.append(f"hostRegister zero-staging: not available ({hr.get('why')})")
    else:
        par = (f"; registering 64 MiB windows on {hr['parallel_threads']} threads {hr['parallel_register_gb_s']:.1f} GB/s"
               if "parallel_register_gb_s" in hr else "")
        lines.append(f"hostRegister zero-staging: copy {hr['copy_gb_s']:.1f} GB/s, with registration "
                     f"{hr['end_to_end_gb_s']:.1f} GB/s{par}")
    return "\n".join(lines)
