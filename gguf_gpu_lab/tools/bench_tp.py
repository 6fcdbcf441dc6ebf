"""``bench --tp``: a tensor-parallel ``hf.from_gguf(tp_plan="auto")`` for worlds 1, 2 and 4, each a
fresh ``torchrun`` launch on 127.0.0.1 (``tools.tp_run`` on every rank): per rank, the bytes read
against its shards and the whole tensors (what a loader that cuts after reading reads on every
rank), the load's wall time and ``from_gguf``'s. On the host backend with gloo, or on the GPUs
with NCCL where there are at least two (worlds up to the GPU count). The same greedy tokens on
every rank of every world are checked before any figure is reported; the file's page-cache read
rate, measured in the same run, is the peak the per-rank read rates are set against.

On the GPUs (NCCL) the same run first measures, in a child process (the ranks get GPUs this
process never touched), for each world: the copy ceiling of its GPUs (``bench_multi.copy_ceiling``:
as many threads copying the file out of the page cache as the ranks' readers together, while each
of the world's GPUs copies from pinned memory) and the pinned H2D peaks (``bench_multi.h2d_peaks``).
Each world is then summed up (``summarize``): the ranks' combined rate (their bytes read over the
slowest rank's load wall time) against the ceiling, and the targets of issue 22: each rank reads
no more than its shards and the replicated tensors + 1 %, and the ranks together reach 0.9 of the
copy ceiling. World 1 (one rank loading the whole model) is the reference of the same run."""

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
from .bench_multi import TARGET_OF_CEILING

TARGET_READ_OVER_SHARDS = 1.01  # each rank: bytes read <= (its shards + the replicated tensors) x 1.01
NO_GPU_CEILING = "no GPUs: the copy ceiling is measured over NCCL ranks' GPUs"
CEILING_MIN_FILE_BYTES = 64 << 20  # the ceiling's copying threads take 16 MiB a copy


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
    """The GPU count and the first GPU's name, read without making a context or a memory pool
    here (the ranks take the GPUs after)."""
    from ..device import _cupy_or_reason, device_count

    if _cupy_or_reason()[1] is not None:
        return 0, None
    n = device_count("cupy")
    if not n:
        return 0, None
    import cupy as cp

    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    return n, name.decode() if isinstance(name, bytes) else name


def machine_kind(card: str | None, gpus: int) -> str | None:
    """The short name of the GPUs a result's file is named by: "h200x2" for two "NVIDIA H200",
    "h100" for one "NVIDIA H100 80GB HBM3"; None without a card."""
    if not card or gpus < 1:
        return None
    words = card.replace("-", " ").split()
    model = next((w for w in words if w[:1].isalpha() and any(c.isdigit() for c in w)),
                 next((w for w in words if any(c.isdigit() for c in w)), "gpu"))
    short = "".join(c for c in model.lower() if c.isalnum()) or "gpu"
    return short if gpus == 1 else f"{short}x{gpus}"


def ceilings(path: str, worlds: Sequence[int], repeat: int = 3) -> dict:
    """For each world: the copy ceiling over GPUs 0..world-1 with the readers of all its ranks
    (best of ``repeat``), and the pinned H2D peaks of those GPUs. Run in a child process
    (``measure_ceilings``): it leaves pinned memory and device pools behind."""
    from ..loader import default_readers
    from .bench_multi import copy_ceiling, h2d_peaks

    per_rank = default_readers(1)  # each rank's load: one device, the loader's default readers
    out = {}
    for w in worlds:
        devices = list(range(w))
        best = max((copy_ceiling(path, w * per_rank, devices) for _ in range(repeat)), key=lambda c: c["copy_gb_s"])
        out[str(w)] = {"devices": devices, "readers_per_rank": per_rank, "threads": w * per_rank,
                       "copy_gb_s": best["copy_gb_s"], "copy_ceiling": best, "h2d": h2d_peaks(devices)}
    return out


def measure_ceilings(path: str, worlds: Sequence[int], timeout_s: float) -> dict:
    """``ceilings`` in a child process, so that the ranks launched after get clean GPUs; a file
    too small for the copying threads is a recorded reason, not a figure."""
    if os.path.getsize(path) < CEILING_MIN_FILE_BYTES:
        return {"skipped": f"the file is smaller than {CEILING_MIN_FILE_BYTES >> 20} MiB: no copy ceiling "
                           "(use --params 1B or more)"}
    with tempfile.TemporaryDirectory(prefix="gguf-lab-tp-ceiling-") as d:
        out = os.path.join(d, "ceilings.json")
        cmd = [sys.executable, "-m", "gguf_gpu_lab.tools.bench_tp", "ceilings", path, out, *map(str, worlds)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise GGUFLabError(f"bench --tp: the copy ceilings did not finish in {timeout_s:.0f} s") from None
        if p.returncode != 0:
            raise GGUFLabError(f"bench --tp: the copy ceilings failed (exit {p.returncode}):\n"
                               f"{(p.stdout + p.stderr)[-4000:]}")
        with open(out) as f:
            return json.load(f)


def world_summary(rows: Sequence[dict], ceiling_gb_s: float | None) -> dict:
    """One world's ranks (rows of ``bench_tp``'s results): bytes read together, the slowest
    rank's load wall time, the combined GB/s (all bytes read over that time) and each rank's,
    the combined rate's share of ``ceiling_gb_s`` (None: not measured), and the targets met:
    every rank reads at most (its shards + the replicated tensors) x 1.01, and the share >= 0.9
    (None where there is no ceiling)."""
    if not rows:
        raise GGUFLabError("world_summary: no ranks")
    total = sum(r["bytes_read"] for r in rows)
    slowest = max(r["load_wall_s"] for r in rows)
    combined = total / slowest / 1e9 if slowest > 0 else None
    ranks = {}
    for r in sorted(rows, key=lambda r: r["rank"]):
        allowed = (r["shard_bytes"] + r["replicated_bytes"]) * TARGET_READ_OVER_SHARDS
        ranks[str(r["rank"])] = {"bytes_read": r["bytes_read"], "shard_bytes": r["shard_bytes"],
                                 "replicated_bytes": r["replicated_bytes"], "allowed_bytes": allowed,
                                 "load_wall_s": r["load_wall_s"],
                                 "gb_s": r["bytes_read"] / r["load_wall_s"] / 1e9 if r["load_wall_s"] > 0 else None,
                                 "reads_within_shards_plus_1pct": r["bytes_read"] <= allowed}
    share = combined / ceiling_gb_s if combined is not None and ceiling_gb_s else None
    return {"ranks": len(rows), "bytes_read": total, "slowest_load_wall_s": slowest, "combined_gb_s": combined,
            "per_rank": ranks, "copy_ceiling_gb_s": ceiling_gb_s, "of_copy_ceiling": share,
            "met": {"reads_within_shards_plus_1pct": all(x["reads_within_shards_plus_1pct"] for x in ranks.values()),
                    "of_copy_ceiling": None if share is None else share >= TARGET_OF_CEILING}}


def summarize(rows: Sequence[dict], ceils: dict) -> dict:
    """``world_summary`` of each world in ``rows``, keyed by the world as a string, with its
    ceiling from ``ceils`` (``measure_ceilings``'s answer; one with "skipped" gives none); where
    world 1 ran, each world's combined rate over world 1's (``vs_world_1``)."""
    by_world: dict[int, list[dict]] = {}
    for r in rows:
        by_world.setdefault(r["world"], []).append(r)
    out = {}
    for w in sorted(by_world):
        c = ceils.get(str(w)) if "skipped" not in ceils else None
        out[str(w)] = {"world": w, **world_summary(by_world[w], c["copy_gb_s"] if c else None)}
    ref = out.get("1", {}).get("combined_gb_s")
    for s in out.values():
        s["vs_world_1"] = s["combined_gb_s"] / ref if ref and s["combined_gb_s"] is not None else None
    return out


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
        from ..hf import config_dict
        from ..hf_tp import check_heads
        from ..model import open_model

        with open_model(path, warmup=False) as m:
            cfg = config_dict(m)
        for w in runs:  # a world that cannot split the heads is refused before any launch
            check_heads(cfg, w, path)
        peak = page_cache_gb_s(path)
        ceils = measure_ceilings(path, runs, timeout_s) if device == "cuda" else {"skipped": NO_GPU_CEILING}
        rows, tokens = [], {}
        for w in runs:
            for rep in run_world(path, w, device, dtype, timeout_s):
                tokens[(w, rep["rank"])] = rep["tokens"]
                rows.append({"world": w, "rank": rep["rank"], "device": rep["device"], "backend": rep["backend"],
                             "nccl": rep["nccl"], "bytes_read": rep["read_bytes"], "wanted_bytes": rep["wanted_bytes"],
                             "shard_bytes": rep["wanted_bytes"] - rep["replicated_bytes"],
                             "replicated_bytes": rep["replicated_bytes"],
                             "whole_bytes": rep["whole_bytes"], "read_fraction": rep["read_bytes"] / rep["whole_bytes"],
                             "load_wall_s": rep["load_wall_s"], "from_gguf_s": rep["from_gguf_s"],
                             "read_gb_s": rep["read_bytes"] / rep["load_wall_s"] / 1e9 if rep["load_wall_s"] else None,
                             "sharded_tensors": rep["sharded_tensors"], "tensors": rep["tensors"]})
        first = next(iter(tokens.values()))
        if any(t != first for t in tokens.values()):
            raise GGUFLabError(f"bench --tp: greedy tokens differ between ranks or worlds: {tokens}")
        size = os.path.getsize(path)
    machine = {**machine_info(), "card": card, "gpus": gpus, **_versions(device)}
    if device == "cuda":  # the result's file is named by the GPUs (save_result), e.g. tp-...-h200x2.json
        machine["kind"] = machine_kind(card, gpus)
    return {"benchmark": "tp", "machine": machine, "model": os.path.basename(path), "synth": synth_info,
            "file_bytes": size, "device": device, "dtype": dtype, "backend": rows[0]["backend"],
            "nccl": next((r["nccl"] for r in rows if r["nccl"]), None), "worlds": runs, "skipped_worlds": skipped,
            "tokens": first, "peak": {"page_cache_gb_s_1_thread": peak}, "ceilings": ceils,
            "targets": {"read_over_shards_and_replicated": TARGET_READ_OVER_SHARDS, "of_copy_ceiling": TARGET_OF_CEILING},
            "summary": summarize(rows, ceils), "results": rows}


def format_tp(res: dict) -> str:
    m = res["machine"]
    lines = [f"tensor-parallel from_gguf, {res['model']} ({res['file_bytes'] / 1e6:.1f} MB), {res['device']} "
             f"({m.get('card') or m['cpu']}, {m['date']}); page cache, one thread: "
             f"{res['peak']['page_cache_gb_s_1_thread']:.2f} GB/s",
             f"{'world':>5} {'rank':>4} {'read MB':>9} {'shards MB':>9} {'whole MB':>9} {'read/whole':>10} "
             f"{'load s':>7} {'GB/s':>6} {'from_gguf s':>11}"]
    for r in res["results"]:
        lines.append(f"{r['world']:5d} {r['rank']:4d} {r['bytes_read'] / 1e6:9.2f} {r['wanted_bytes'] / 1e6:9.2f} "
                     f"{r['whole_bytes'] / 1e6:9.2f} {r['read_fraction']:10.3f} {r['load_wall_s']:7.3f} "
                     f"{(r['read_gb_s'] or 0):6.2f} {r['from_gguf_s']:11.2f}")
    if res["skipped_worlds"]:
        lines.append(f"left out (more ranks than GPUs): worlds {res['skipped_worlds']}")
    lines.append(f"greedy tokens, the same on every rank of every world: {res['tokens']}")
    ceils = res.get("ceilings", {})
    if "skipped" in ceils:
        lines.append(f"copy ceiling: none ({ceils['skipped']})")
    for w, c in ({} if "skipped" in ceils else ceils).items():
        h = c["h2d"]
        lines.append(f"world {w}: copy ceiling {c['copy_gb_s']:.1f} GB/s ({c['threads']} threads copying out of the page "
                     f"cache while GPUs {c['devices']} copy); pinned H2D together {h['together']['total_gb_s']:.1f} GB/s")
    for w, s in res.get("summary", {}).items():
        of = f"{s['of_copy_ceiling']:.2f} of the copy ceiling" if s["of_copy_ceiling"] is not None else "no ceiling"
        vs = f", {s['vs_world_1']:.2f}x world 1" if s.get("vs_world_1") is not None and w != "1" else ""
        rates = ", ".join(f"rank {k} {x['gb_s']:.2f}" for k, x in s["per_rank"].items() if x["gb_s"] is not None)
        met = s["met"]
        lines.append(f"world {w}: {s['bytes_read'] / 1e6:.2f} MB read in {s['slowest_load_wall_s']:.3f} s (slowest rank): "
                     f"{(s['combined_gb_s'] or 0):.2f} GB/s together ({rates}), {of}{vs}; reads within shards + "
                     f"1 %: {'yes' if met['reads_within_shards_plus_1pct'] else 'NO'}; >= {TARGET_OF_CEILING} of the "
                     f"ceiling: {'-' if met['of_copy_ceiling'] is None else 'yes' if met['of_copy_ceiling'] else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m gguf_gpu_lab.tools.bench_tp ceilings PATH OUT.json WORLD...``: ``ceilings``
    written to OUT.json (what ``measure_ceilings`` runs in its child process)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m gguf_gpu_lab.tools.bench_tp")
    p.add_argument("what", choices=["ceilings"])
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("worlds", type=int, nargs="+")
    a = p.parse_args(argv)
    res = ceilings(a.path, a.worlds)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
