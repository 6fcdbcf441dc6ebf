"""``bench --remote``: a load over HTTP against the same server's raw ranged transfer of the same
bytes with the same connections into memory, measured in the same run, unthrottled and throttled;
both also against the local load of the same file.

The server (tools/http_server.py, sendfile(2) when unthrottled) runs in its own process, so that
its threads do not share the loading process's GIL. The transfer reads exactly the load's chunks
with the load's own read (``staging.read_chunk``: the same requests, one per run of adjacent
pieces) through the model's own source (its connections, one per reader thread) into buffers in
memory: the ceiling a streamed load can reach. A load whose copies and kernels are hidden under
the download takes about the transfer's time (target: 1.1x, 1.05x throttled). A profiled load
says where its time went (``profiled_load``: its first request, its last read's end, its wall).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import numpy as np

from ..errors import GGUFLabError
from .bench import bench_model, machine_info

TARGETS = {"unthrottled": 1.1, "throttled": 1.05}  # load wall time / transfer time, on the GPU


@contextlib.contextmanager
def server_process(folder: str, rate_gbps: float | None = None):
    """``python -m gguf_gpu_lab.tools.http_server folder`` in a child process; yields its endpoint."""
    cmd = [sys.executable, "-m", "gguf_gpu_lab.tools.http_server", folder]
    if rate_gbps:
        cmd += ["--rate-gbps", str(rate_gbps)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = p.stdout.readline().strip()
        if not endpoint.startswith("http://"):
            raise RuntimeError(f"the benchmark's HTTP server did not start ({endpoint!r})")
        yield endpoint
    finally:
        p.terminate()
        p.wait(10)
        p.stdout.close()


def transfer(model, connections: int, chunk_mb: float = 16.0) -> tuple[float, int]:
    """Seconds to read the bytes of every chunk a load reads, with ``connections`` threads over
    the model's source, into memory; and the bytes read. Each chunk is read as the load's
    readers read it (``read_chunk``: the same requests, each run of adjacent pieces in one),
    inside one ``use()`` of the source as a load is (connections opened on demand, closed at
    the end), into a buffer of its thread's instead of a pinned staging slot."""
    from ..loader import plan_chunks
    from ..loader.staging import read_chunk

    chunks = plan_chunks(model.tensors, max(1, int(chunk_mb * (1 << 20))), ramp=connections)
    if not chunks:
        return 0.0, 0
    it, lock = iter(chunks), threading.Lock()
    biggest = max(c.nbytes for c in chunks)
    errors: list[BaseException] = []
    src = model.source

    n_threads = min(connections, len(chunks))
    # written once before the clock starts, as the load's kept staging ring is: no page faults timed
    bufs = [np.ones(biggest, np.uint8) for _ in range(n_threads)]

    def run(buf):
        try:
            while True:
                with lock:
                    c = next(it, None)
                if c is None:
                    return
                read_chunk(src, c.pieces, buf, False)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(bufs[i],), name=f"bench-transfer{i}") for i in range(n_threads)]
    with src.use():
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt, sum(c.nbytes for c in chunks)


def measure(url: str, local: str, connections: int, mode: str, dtype: str, backend: str, repeat: int,
            rate_gbps: float | None, chunk_mb: float = 16.0) -> dict:
    """One server setting: transfer and load, alternated ``repeat`` times (best of each), the
    local load, and per-connection rates from one profiled load."""
    from ..loader import load
    from ..model import open_model
    from ..remote import fetch_lanes

    opts = dict(mode=mode, dtype=dtype, readers=connections, backend=backend, chunk_mb=chunk_mb)
    with open_model(url) as m, open_model(local) as lm:
        ref = load(lm, **opts, profile=False)
        got = load(m, **opts, profile=False)  # warms the connections; checked bit for bit
        same = all(np.array_equal(got[n].numpy(), ref[n].numpy(), equal_nan=True) for n in ref.keys())
        del got
        xfer, loads, local_walls = [], [], []
        nbytes = 0
        for _ in range(repeat):
            dt, nbytes = transfer(m, connections, chunk_mb)
            xfer.append(dt)
            loads.append(load(m, **opts, profile=False).wall_s)
            local_walls.append(load(lm, **opts, profile=False).wall_s)
        prof = load(m, **opts, profile=True).profile
        lanes = fetch_lanes(prof)
    # where a profiled load's time goes: before the first request, the reading, after the last
    phases = {"wall_ms": prof.wall_s * 1e3, "first_read_ms": lanes["first_us"].min() / 1e3,
              "last_first_read_ms": lanes["first_us"].max() / 1e3, "reads_end_ms": lanes["last_us"].max() / 1e3,
              "reader_busy_ms_mean": lanes["busy_us"].mean() / 1e3}
    t, lw, loc = min(xfer), min(loads), min(local_walls)
    return {"rate_gbps": rate_gbps, "bytes": nbytes, "identical_to_local": bool(same),
            "transfer_s": t, "transfer_gb_s": nbytes / t / 1e9, "load_s": lw, "load_gb_s": nbytes / lw / 1e9,
            "load_over_transfer": lw / t, "local_load_s": loc, "load_over_local": lw / loc,
            "transfer_runs_s": xfer, "load_runs_s": loads, "profiled_load": phases,
            "connections": lanes.to_dict("records")}


def bench_remote(model_path: str | None = None, params: str = "8B", mix: str = "Q4_K_M", connections: int = 16,
                 rate_gbps: float = 1.0, mode: str = "gpu", dtype: str = "float16", backend: str = "cupy",
                 repeat: int = 3, chunk_mb: float = 16.0) -> dict:
    """The benchmark's JSON result (see the module's docstring)."""
    if not 1 <= connections <= 256:
        raise GGUFLabError(f"connections must be between 1 and 256, got {connections}")
    if not 0.001 <= rate_gbps <= 1000:
        raise GGUFLabError(f"rate_gbps must be between 0.001 and 1000, got {rate_gbps}")
    if not 0.0625 <= chunk_mb <= 1024:
        raise GGUFLabError(f"chunk_mb must be between 0.0625 and 1024, got {chunk_mb}")
    if not 1 <= repeat <= 100:
        raise GGUFLabError(f"repeat must be between 1 and 100, got {repeat}")
    from ..device import get_backend

    with bench_model(model_path, params, mix) as (path, synth_info):
        folder, name = os.path.split(os.path.abspath(path))
        runs = {}
        for label, rate in (("unthrottled", None), ("throttled", rate_gbps)):
            with server_process(folder, rate) as endpoint:
                runs[label] = measure(f"{endpoint}/files/{name}", path, connections, mode, dtype, backend, repeat, rate,
                                       chunk_mb)
                runs[label]["target"] = TARGETS[label]
        from importlib.metadata import version

        versions = {}
        for pkg in ("requests", "huggingface_hub", "cupy-cuda13x", "cupy-cuda12x", "torch"):
            with contextlib.suppress(Exception):
                versions[pkg] = version(pkg)
        return {"benchmark": "remote", "machine": machine_info(), "device": get_backend(backend).info(),
                "versions": versions, "model": {"path": name, "file_bytes": os.path.getsize(path), "synth": synth_info},
                "settings": {"connections": connections, "chunk_mb": chunk_mb, "mode": mode, "dtype": dtype, "repeat": repeat,
                             "server": "gguf_gpu_lab.tools.http_server in a child process (sendfile when unthrottled)"},
                "runs": runs}


def format_remote(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"load over HTTP (loopback) against the raw ranged transfer, {s['connections']} connections, "
             f"{s['mode']} {s['dtype']} on {res['device'].get('name')} ({m['date']})",
             f"{'server':12} {'transfer GB/s':>13} {'load GB/s':>10} {'load/xfer':>10} {'target':>7} "
             f"{'local s':>8} {'load/local':>10}  identical"]
    for label, r in res["runs"].items():
        lines.append(f"{label:12} {r['transfer_gb_s']:13.2f} {r['load_gb_s']:10.2f} {r['load_over_transfer']:10.3f} "
                     f"{r['target']:7.2f} {r['local_load_s']:8.3f} {r['load_over_local']:10.2f}  "
                     f"{'yes' if r['identical_to_local'] else 'NO'}")
    for label, r in res["runs"].items():
        p = r.get("profiled_load")
        if p:
            lines.append(f"{label}: profiled load {p['wall_ms']:.0f} ms: first request at {p['first_read_ms']:.1f} ms "
                         f"(last connection's at {p['last_first_read_ms']:.1f}), reads end at {p['reads_end_ms']:.0f} ms, "
                         f"each connection busy {p['reader_busy_ms_mean']:.0f} ms on average")
    return "\n".join(lines)
