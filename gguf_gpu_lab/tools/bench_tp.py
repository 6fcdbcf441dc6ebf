"""``bench --tp``: a tensor-parallel ``hf.from_gguf(tp_plan="auto")`` for worlds 1, 2 and 4, each a
fresh ``torchrun`` launch on 127.0.0.1 (``tools.tp_run`` on every rank): per rank, the bytes read
against its shards and the whole tensors (what a loader that cuts after reading reads on every
rank), the load's wall time and ``from_gguf``'s. On the host backend with gloo, or on the GPUs
with NCCL where there are at least two (worlds up to the GPU count). The same greedy tokens on
every rank of every world are checked before any figure is reported; the file's page-cache read
rate, measured in the same run, is the peak the per-rank read rates are set against."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from ..errors import GGUFLabError
from .bench import bench_model, machine_info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions(device: str) -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("torch", "transformers", *(("cupy-cuda12x", "cupy-cuda13x", "cupy") if device == "cuda" else ())):
        try:
            out[name] = version(name)
        except Exception:
            pass
    return out


def _gpu_info() -> tuple[int, str | None]:
    from ..device import _cupy_or_reason, device_count, device_info

    if _cupy_or_reason()[1] is not None:
        return 0, None
    return device_count("cupy"), device_info("cupy", 0).get("name")


def page_cache_gb_s(path: str, repeat: int = 3) -> float:
    """GB/s of one thread copying the whole (cached) file out of its mapping: best of ``repeat``."""
    data = np.memmap(path, np.uint8, mode="r")
    buf = np.empty(min(len(data), 256 << 20), np.uint8)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for lo in range(0, len(data), len(buf)):
            n = min(len(buf), len(data) - lo)
            np.copyto(buf[:n], data[lo:lo + n])
        best = min(best, time.perf_counter() - t0)
    del data
    return os.path.getsize(path) / best / 1e9


def run_world(path: str, world: int, device: str, dtype: str, timeout_s: float) -> list[dict]:
    """One torchrun launch of ``world`` ranks; each rank's report (``tp_run``)."""
    with tempfile.TemporaryDirectory(prefix="gguf-lab-tp-") as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "gguf_gpu_lab.tools.tp_run", path,
               "--device", device, "--dtype", dtype, "--tokens", "4", "--json-dir", d]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise GGUFLabError(f"bench --tp: world {world} did not finish in {timeout_s:.0f} s") from None
        if p.returncode != 0:
            raise GGUFLabError(f"bench --tp: world {world} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
        return [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(world)]


def bench_tp(model_path: str | None = None, params: str = "25M", mix: str = "Q4_K_M",
             worlds: Sequence[int] = (1, 2, 4), device: str = "auto", dtype: str = "float16",
             timeout_s: float = 600.0) -> dict:
    """Per-rank bytes read and load time of a tensor-parallel load for each world in ``worlds``
    (1 to 64 ranks; on GPUs the worlds above the GPU count are left out, and said so).
    ``device``: "auto" (the GPUs where there are at least two, else the CPU), "cuda" or "cpu"."""
    if not all(isinstance(w, int) and 1 <= w <= 64 for w in worlds) or not worlds:
        raise GGUFLabError(f"bench --tp: worlds must be integers from 1 to 64, got {list(worlds)}")
    if not 1 <= timeout_s <= 3600:
        raise GGUFLabError(f"bench --tp: timeout_s must be from 1 to 3600, got {timeout_s}")
    gpus, card = _gpu_info()
    if device == "auto":
        device = "cuda" if gpus >= 2 else "cpu"
    if device not in ("cuda", "cpu"):
        raise GGUFLabError(f"bench --tp: device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    skipped = [w for w in worlds if device == "cuda" and w > gpus]
    runs = [w for w in worlds if w not in skipped]
    if not runs:
        raise GGUFLabError(f"bench --tp: no world fits the {gpus} GPUs here: {list(worlds)}")
    # trained-model sized weights: float16 logits stay finite and the greedy tokens mean something
    with bench_model(model_path, params, mix, weights="small") as (path, synth_info):
        peak = page_cache_gb_s(path)
        rows, tokens = [], {}
        for w in runs:
            for rep in run_world(path, w, device, dtype, timeout_s):
                tokens[(w, rep["rank"])] = rep["tokens"]
                rows.append({"world": w, "rank": rep["rank"], "device": rep["device"],
                             "read_bytes": rep["read_bytes"], "wanted_bytes": rep["wanted_bytes"],
                             "whole_bytes": rep["whole_bytes"], "read_fraction": rep["read_bytes"] / rep["whole_bytes"],
                             "load_wall_s": rep["load_wall_s"], "from_gguf_s": rep["from_gguf_s"],
                             "read_gb_s": rep["read_bytes"] / rep["load_wall_s"] / 1e9 if rep["load_wall_s"] else None,
                             "sharded_tensors": rep["sharded_tensors"], "tensors": rep["tensors"]})
        first = next(iter(tokens.values()))
        if any(t != first for t in tokens.values()):
            raise GGUFLabError(f"bench --tp: greedy tokens differ between ranks or worlds: {tokens}")
        size = os.path.getsize(path)
    return {"benchmark": "tp", "machine": {**machine_info(), "card": card, "gpus": gpus, **_versions(device)},
            "model": os.path.basename(path), "synth": synth_info, "file_bytes": size, "device": device,
            "dtype": dtype, "worlds": runs, "skipped_worlds": skipped, "tokens": first,
            "peak": {"page_cache_gb_s_1_thread": peak}, "results": rows}


def format_tp(res: dict) -> str:
    m = res["machine"]
    lines = [f"tensor-parallel from_gguf, {res['model']} ({res['file_bytes'] / 1e6:.1f} MB), {res['device']} "
             f"({m.get('card') or m['cpu']}, {m['date']}); page cache, one thread: "
             f"{res['peak']['page_cache_gb_s_1_thread']:.2f} GB/s",
             f"{'world':>5} {'rank':>4} {'read MB':>9} {'shards MB':>9} {'whole MB':>9} {'read/whole':>10} "
             f"{'load s':>7} {'GB/s':>6} {'from_gguf s':>11}"]
    for r in res["results"]:
        lines.append(f"{r['world']:5d} {r['rank']:4d} {r['read_bytes'] / 1e6:9.2f} {r['wanted_bytes'] / 1e6:9.2f} "
                     f"{r['whole_bytes'] / 1e6:9.2f} {r['read_fraction']:10.3f} {r['load_wall_s']:7.3f} "
                     f"{(r['read_gb_s'] or 0):6.2f} {r['from_gguf_s']:11.2f}")
    if res["skipped_worlds"]:
        lines.append(f"left out (more ranks than GPUs): worlds {res['skipped_worlds']}")
    lines.append(f"greedy tokens, the same on every rank of every world: {res['tokens']}")
    return "\n".join(lines)
