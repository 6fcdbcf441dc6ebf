"""``hf.export`` against the disk it writes to, in the same run: the disk's sequential write speed
(the export's own pattern: large pieces written into preallocated files, then fsync; by one thread
and by as many as the export's writers, the faster counting),
the export's wall time of the same file (a synthetic 8B Q4_K_M to bfloat16 by default), the ratio
of the two (target at least 0.8), and the export process's peak host memory (target at most the
budget + 1 GB). Also ``hf.tokenizer`` on a 262,144-token vocabulary (target at most 1 s),
transformers' ``from_pretrained(gguf_file=...)`` + ``save_pretrained`` on a smaller file (it takes
minutes on 8B; neither side writes a tokenizer there), and transformers'
``AutoTokenizer.from_pretrained(gguf_file=...)`` against ``hf.tokenizer`` (time and ids).

Every phase runs in a child process of its own, with what is left of the run's time limit
(``--time-limit``, default 200 s): a phase that runs out is killed and recorded as stopped, and
the result (JSON) is written after every phase, so a run stopped anywhere keeps what it measured.
Each phase's start is said on stderr. The export's child reports its own peak memory
(``ru_maxrss``), after a warm-up that imports transformers' model modules and maps the names
(what a process's first export adds, reported apart): the timed export is what every later one
in a process costs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from ..outputs import pwrite_all
from .bench import bench_model, machine_info, package_version, save_result

TEXT = "The capital of France is Paris; \u00e9t\u00e9, \u4e2d\u6587, <tok100> and   spaces."


def disk_write_speed(folder: str, nbytes: int, piece: int = 64 << 20, file_size: int = 5 * 10**9,
                     writers: int = 1) -> dict:
    """Write ``nbytes`` of random data into files of at most ``file_size`` bytes (preallocated with
    ftruncate, written in ``piece``-byte pwrites by ``writers`` threads taking the pieces in file
    order, as the export's writers take its ring's buffers), fsync them, and delete them: GB/s of
    the whole."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    buf = memoryview(np.random.default_rng(0).integers(0, 256, piece, dtype=np.uint8)).cast("B")
    paths = []

    def put(fd: int, pos: int, n: int) -> None:
        pwrite_all(fd, buf[:n], pos)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(writers, thread_name_prefix="disk-speed") as pool:
            left, k = nbytes, 0
            while left > 0:
                size = min(left, file_size)
                path = os.path.join(folder, f"disk-speed-{k}.bin")
                paths.append(path)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.ftruncate(fd, size)
                    for f in [pool.submit(put, fd, pos, min(piece, size - pos)) for pos in range(0, size, piece)]:
                        f.result()
                    os.fsync(fd)
                finally:
                    os.close(fd)
                left -= size
                k += 1
        seconds = time.perf_counter() - t0
    finally:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)
    return {"bytes": nbytes, "seconds": seconds, "write_gb_s": nbytes / seconds / 1e9, "piece_bytes": piece,
            "writers": writers}


def disk_peak(folder: str, nbytes: int) -> dict:
    """``disk_write_speed`` with one writer and with the export's writers (``RING_WRITERS``): the
    faster is the disk's speed the export is held against (one thread alone can be slower than
    the disk), both are kept under ``"by_writers"``."""
    from ..export_ring import RING_WRITERS

    runs = [disk_write_speed(folder, nbytes, writers=w) for w in sorted({1, RING_WRITERS})]
    best = max(runs, key=lambda r: r["write_gb_s"])
    return {**best, "by_writers": {str(r["writers"]): r["write_gb_s"] for r in runs}}


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _export_phase(args: dict) -> dict:
    """The export in this (child) process: its result, the memory before it and the peak."""
    import resource

    from .. import hf, hf_convert
    from ..model import shared_model

    model = shared_model(args["path"])
    hf_convert._deps()
    t0 = time.perf_counter()  # what a process's first export adds: transformers' model modules imported, names mapped
    hf_convert._Conversion(model, args["dtype"])
    warmup = time.perf_counter() - t0
    before = _rss_now()
    r = hf.export(model, args["out"], dtype=args["dtype"], budget=args["budget"], device=args["device"], progress=False)
    shutil.rmtree(args["out"])
    return {"wall_s": r.wall_s, "steps_s": r.steps_s, "weight_bytes": r.weight_bytes, "gb_s": r.gb_s,
            "n_tensors": r.n_tensors, "files": list(r.files), "rss_before_bytes": before, "first_call_extra_s": warmup,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _disk_phase(args: dict) -> dict:
    """The disk's sequential write speed for as many bytes as the export writes (its size from
    the model's shapes)."""
    from .. import hf_convert
    from ..model import shared_model

    conv = hf_convert._Conversion(shared_model(args["path"]), args["dtype"])
    size = 4 if args["dtype"] == "float32" else 2
    wanted = set(conv.names[g] for g in conv.wanted)
    nbytes = sum(p.numel() for n, p in conv.hf_model.state_dict().items() if n in wanted) * size
    del conv
    return {**disk_peak(args["work"], nbytes), "export_bytes_estimate": nbytes}


_PHASES = {"disk": _disk_phase, "export": _export_phase,
           "baseline": lambda a: _baseline(a["work"], a["params"], a["dtype"], a["device"], a["vocab"], a.get("path")),
           "tokenizer": lambda a: _tokenizer_timing(a["work"], a["vocab"]),
           "tokenizer_reference": lambda a: _tokenizer_reference(a["work"], a["vocab"])}


def _run_phase(name: str, args: dict, timeout: float) -> dict:
    """One phase in a child process of its own, stopped (killed) after ``timeout`` seconds; a
    second before that, the child writes every thread's stack to its stderr (``faulthandler``),
    which the ``TimeoutExpired`` carries: where a stopped phase was."""
    env = dict(os.environ, GGUF_LAB_PROGRESS="0")
    args = {**args, "_stacks_after_s": max(0.5, timeout - 1.0)}
    cmd = [sys.executable, "-m", "gguf_gpu_lab.tools.bench_export", "--phase", name, json.dumps(args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0 and re.search(r"^Timeout \([\d:.]+\)!$", p.stderr, re.M):
        # the stacks were written at the limit and the child died of it (dumping other threads'
        # frames can crash an interpreter): stopped by the time limit, as if killed a second later
        raise subprocess.TimeoutExpired(cmd, timeout, stderr=p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"the {name} phase's child process failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _same_safetensors(a: str, b: str) -> dict:
    """Every tensor of folder ``a`` against folder ``b``, byte for byte."""
    import torch
    from safetensors import safe_open

    def where(folder):  # tensor name -> its shard (one tensor at a time in memory: 8B is 16 GB a side)
        out = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), framework="pt") as f:
                    out.update(dict.fromkeys(f.keys(), os.path.join(folder, name)))
        return out

    wa, wb = where(a), where(b)
    same = 0
    for k in wb:
        if k in wa:
            with safe_open(wa[k], framework="pt") as fa, safe_open(wb[k], framework="pt") as fb:
                x, y = fa.get_tensor(k), fb.get_tensor(k)
            same += (x.dtype == y.dtype and x.shape == y.shape
                     and torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)))
    return {"tensors": len(wb), "bit_identical_tensors": same, "same_names": wa.keys() == wb.keys()}


def _baseline(work: str, params: str, dtype: str, device: str, vocab: int | None, path: str | None = None) -> dict:
    """Ours and transformers' ``from_pretrained(gguf_file=...)`` + ``save_pretrained`` on ``path``
    (the benchmark's own file), or on a synthetic file of ``params`` made here (a smaller one:
    transformers takes minutes on 8B)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .. import hf
    from .synth import synth

    own = path is None
    if own:
        path = os.path.join(work, f"baseline-{params}.gguf")
        synth(path, params, "Q4_K_M", vocab=vocab, weights="small")
    t0 = time.perf_counter()
    hf.export(path, os.path.join(work, "ours"), dtype=dtype, device=device, progress=False, tokenizer=False)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                                               dtype=getattr(torch, dtype), use_kernels=False)
    detached = None
    try:
        ref.save_pretrained(os.path.join(work, "transformers"))
    except ValueError as e:  # transformers 5.25: "The model is quantized with gguf and is not serializable"
        detached = str(e)[:200]
        ref.hf_quantizer = None  # the weights are dequantized tensors on the CPU: saved as any model's
        if hasattr(ref.config, "quantization_config"):
            del ref.config.quantization_config
        ref.save_pretrained(os.path.join(work, "transformers"))
    theirs = time.perf_counter() - t0
    del ref
    same = _same_safetensors(os.path.join(work, "ours"), os.path.join(work, "transformers"))
    res = {"params": params, "file": os.path.basename(path), "file_bytes": os.path.getsize(path),
           "ours_s": ours, "transformers_s": theirs,
           "save_pretrained_refused": detached,
           "tokenizer": "written by neither: transformers' from_pretrained + save_pretrained of the model writes "
                        "none, so our export here runs with tokenizer=False (the tokenizer phases time it)",
           "speedup": theirs / ours, **same,
           "bit_identical": same["same_names"] and same["bit_identical_tensors"] == same["tensors"]}
    for sub in ("ours", "transformers"):
        shutil.rmtree(os.path.join(work, sub))
    if own:
        os.unlink(path)
    return res


def _vocab_file(work: str, vocab: int) -> str:
    """A synthetic file of ``vocab`` tokens (its weights not written), made once in ``work``."""
    from .synth import synth

    path = os.path.join(work, f"vocab-{vocab}.gguf")
    if not os.path.exists(path):
        synth(path + ".tmp", "1M", "Q8_0", vocab=vocab, data=False)
        os.replace(path + ".tmp", path)
    return path


def _fingerprint(tok) -> dict:
    import hashlib

    return {"class": type(tok).__name__, "ids": tok(TEXT)["input_ids"],
            "backend_sha256": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()}


def _tokenizer_timing(work: str, vocab: int, repeat: int = 3) -> dict:
    """``hf.tokenizer`` on a ``vocab``-token file: the process's first call (imports included) and
    the median of ``repeat`` more."""
    from .. import hf

    path = _vocab_file(work, vocab)
    t0 = time.perf_counter()
    ours = hf.tokenizer(path)
    first = time.perf_counter() - t0
    runs, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        ours = hf.tokenizer(path)
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"vocab": vocab, "ours_first_s": first, "ours_s": statistics.median(runs), "ours_all_s": runs,
            "ours_cpu_s": statistics.median(cpu), "target_s": 1.0, **_fingerprint(ours)}


def _tokenizer_reference(work: str, vocab: int) -> dict:
    """transformers' ``AutoTokenizer.from_pretrained(gguf_file=...)`` on a ``vocab``-token file
    (timed), and whether ``hf.tokenizer`` gives the same ids and backend there."""
    from transformers import AutoTokenizer

    from .. import hf

    path = _vocab_file(work, vocab)
    hf.tokenizer(path)  # the imports both share, before the clock
    t0 = time.perf_counter()
    ref = AutoTokenizer.from_pretrained(work, gguf_file=os.path.basename(path))
    theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = hf.tokenizer(path)
    mine = time.perf_counter() - t0
    a, b = _fingerprint(ours), _fingerprint(ref)
    return {"vocab": vocab, "transformers_s": theirs, "ours_s": mine, "speedup": theirs / mine,
            "same_ids": a["ids"] == b["ids"], "same_backend": a["backend_sha256"] == b["backend_sha256"],
            "same_class": a["class"] == b["class"]}


def bench_export(model_path: str | None = None, params: str = "8B", mix: str = "Q4_K_M", dtype: str = "bfloat16",
                 device: str = "auto", budget: str = "2GB", work_dir: str = ".", baseline_params: str | None = "1B",
                 vocab: int | None = None, tokenizer_vocab: int | None = 262144, time_limit: float = 200.0,
                 reference_vocab: int | None = None, save: Callable[[dict], object] | None = None) -> dict:
    """The export of ``model_path`` (or a synthetic llama of ``params`` and ``mix``) into a temporary
    folder under ``work_dir``, against that disk's write speed; ``baseline_params`` (None skips it)
    and ``tokenizer_vocab`` (None skips it) size the comparisons with transformers
    (``reference_vocab``, default ``tokenizer_vocab``: the vocabulary transformers' own tokenizer
    is timed on; its conversion before 5.24 is slow on a large one).

    Each phase (the disk's write speed, our export, our tokenizer, transformers' baseline,
    transformers' tokenizer) runs in a child process of its own, stopped when the run's
    ``time_limit`` (seconds from the call) is spent; a phase stopped or failed is recorded as such
    (``{"timed_out_after_s": ...}``, ``{"error": ...}``, ``{"skipped": ...}``) and the next one
    still runs if time is left. ``save(res)`` is called after every phase, so partial results survive.

    Example:
        >>> res = bench_export(params="8B", time_limit=200)      # doctest: +SKIP
        >>> print(format_export(res))                            # doctest: +SKIP
    """
    import torch

    from ..export import _device_for, parse_size

    deadline = time.monotonic() + time_limit
    dev, _, _ = _device_for(device)
    budget_bytes = parse_size(budget, "budget")
    os.makedirs(work_dir, exist_ok=True)
    info = {"device": str(dev)}
    if dev.type == "cuda":
        from .bench_gpu import device_info

        info = device_info()
    res = {"benchmark": "export", "machine": machine_info(), "device": info, "torch": torch.__version__,
           "transformers": package_version("transformers"), "safetensors": package_version("safetensors"),
           "dtype": dtype, "budget_bytes": budget_bytes, "time_limit_s": time_limit, "phases_s": {},
           "targets": {"vs_disk_at_least": 0.8, "peak_rss_at_most_bytes": budget_bytes + 10**9,
                       "tokenizer_at_most_s": 1.0}}

    def phase(name: str, what: str, args: dict) -> dict:
        left = deadline - time.monotonic()
        if left < 1:
            res[name] = {"skipped": f"the run's time limit ({time_limit:g} s) was spent"}
            _say(f"{what}: skipped, the time limit is spent")
        else:
            _say(f"{what} (at most {left:.0f} s)")
            t0 = time.monotonic()
            try:
                res[name] = _run_phase(name, args, left)
            except subprocess.TimeoutExpired as e:
                err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
                res[name] = {"timed_out_after_s": left, "stacks": err[-6000:]}
                _say(f"{what}: stopped by the time limit after {left:.0f} s")
            except RuntimeError as e:
                res[name] = {"error": str(e)[-4000:]}
                _say(f"{what}: failed: {str(e)[-300:]}")
            res["phases_s"][name] = time.monotonic() - t0
        _derive(res)
        if save is not None:
            save(res)
        return res[name]

    with tempfile.TemporaryDirectory(prefix="gguf-lab-bench-export-", dir=work_dir) as work:
        if model_path is None:
            _say(f"a synthetic {params} {mix} llama")
        with bench_model(model_path, params, mix, arch="llama", weights="small",
                         **({"vocab": vocab} if vocab else {})) as (path, synth_info):
            res["model"] = {"path": os.path.basename(path), "file_bytes": os.path.getsize(path), "synth": synth_info}
            common = {"path": path, "work": work, "dtype": dtype}
            phase("disk", f"the disk's sequential write speed, as many bytes as the export, into {work}", common)
            phase("export", "the export, in a child process", {**common, "out": os.path.join(work, "export"),
                                                              "budget": budget_bytes, "device": str(dev)})
            same = baseline_params is not None and baseline_params.lower() == "same"
            if same:  # on the benchmark's own file, while it is there
                phase("baseline", f"transformers' from_pretrained(gguf_file=...) + save_pretrained on {res['model']['path']}",
                      {**common, "params": params, "device": str(dev), "vocab": vocab})
        if tokenizer_vocab:
            phase("tokenizer", f"hf.tokenizer on a {tokenizer_vocab:,}-token vocabulary",
                  {"work": work, "vocab": tokenizer_vocab})
        if baseline_params and not same:
            phase("baseline", f"transformers' from_pretrained(gguf_file=...) + save_pretrained on {baseline_params}",
                  {"work": work, "params": baseline_params, "dtype": dtype, "device": str(dev), "vocab": vocab})
        if tokenizer_vocab or reference_vocab:
            n = reference_vocab or tokenizer_vocab
            phase("tokenizer_reference", f"transformers' AutoTokenizer(gguf_file=) on a {n:,}-token vocabulary",
                  {"work": work, "vocab": n})
    return res


def _derive(res: dict) -> None:
    """The ratios and the targets met, from the phases that have finished."""
    disk, e, tok = res.get("disk", {}), res.get("export", {}), res.get("tokenizer", {})
    met = {}
    if "write_gb_s" in disk and "gb_s" in e:
        res["ratio_to_disk"] = e["gb_s"] / disk["write_gb_s"]
        res["ratio_to_disk_weights_only"] = e["weight_bytes"] / e["steps_s"]["weights_s"] / 1e9 / disk["write_gb_s"]
        met["vs_disk"] = res["ratio_to_disk"] >= res["targets"]["vs_disk_at_least"]
    if "peak_rss_bytes" in e:
        met["peak_rss"] = e["peak_rss_bytes"] <= res["targets"]["peak_rss_at_most_bytes"]
    if "ours_s" in tok:
        met["tokenizer"] = tok["ours_s"] <= res["targets"]["tokenizer_at_most_s"]
    res["meets_targets"] = met


def save_progress(res: dict, out_dir: str, saved: list, out: str | None = None, overwrite: bool = False) -> str:
    """The result written after a phase: the first time into ``out`` (refused if it exists,
    unless ``overwrite``) or a new dated file in ``out_dir`` (``save_result``), later over that
    same file (written beside it and renamed: a run stopped mid-write leaves the previous phase's).
    ``saved`` holds the paths written so far. Returns the path."""
    if saved:
        path = saved[-1]
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(path + ".tmp", path)
        return path
    if out is not None:
        with open(out, "w" if overwrite else "x") as f:
            json.dump(res, f, indent=2)
        return out
    return save_result(res, out_dir, res["benchmark"])


def _say(what: str) -> None:
    """A phase of the benchmark on stderr as it starts, so a run stopped by a time limit shows where."""
    print(f"bench --export: {what}", file=sys.stderr, flush=True)


def _status(part: dict) -> str | None:
    """What stopped a phase, or None when it finished."""
    for key, text in (("skipped", "skipped: {}"), ("timed_out_after_s", "stopped by the time limit after {:.0f} s"),
                      ("error", "failed: {}")):
        if key in part:
            return text.format(part[key] if key != "error" else part[key].strip().splitlines()[-1][:200])
    return None


def format_export(res: dict) -> str:
    d, m = res["device"], res.get("model", {})
    lines = [f"export on {d.get('name', d.get('device'))} ({res['machine']['date']}): {m.get('path')}, "
             f"{m.get('file_bytes', 0) / 1e9:.2f} GB, to {res['dtype']}; torch {res['torch']}, "
             f"transformers {res['transformers']}; time limit {res['time_limit_s']:g} s"]
    k, e = res.get("disk", {}), res.get("export", {})
    by = ", ".join(f"{w} writer{'s' * (w != '1')} {g:.2f}" for w, g in k.get("by_writers", {}).items())
    lines.append(f"disk, sequential write + fsync   {k['bytes'] / 1e9:.2f} GB in {k['seconds']:.2f} s = "
                 f"{k['write_gb_s']:.2f} GB/s" + (f" (the faster of {by} GB/s)" if by else "")
                 if "write_gb_s" in k else f"disk: {_status(k) or 'not run'}")
    if "gb_s" in e:
        ratio = (f" = {res['ratio_to_disk']:.2f} of the disk (target >= {res['targets']['vs_disk_at_least']}); "
                 f"weights alone {res['ratio_to_disk_weights_only']:.2f}" if "ratio_to_disk" in res else "")
        lines += [f"export (child process)          {e['weight_bytes'] / 1e9:.2f} GB in {e['wall_s']:.2f} s = "
                  f"{e['gb_s']:.2f} GB/s{ratio}; a process's first export adds {e['first_call_extra_s']:.1f} s "
                  "(imports, name map)",
                  "  steps: " + ", ".join(f"{s[:-2]} {v:.2f} s" for s, v in e["steps_s"].items()),
                  f"peak host memory                {e['peak_rss_bytes'] / 1e9:.2f} GB (before the export "
                  f"{e['rss_before_bytes'] / 1e9:.2f} GB; target <= {res['targets']['peak_rss_at_most_bytes'] / 1e9:.2f} GB)"]
    else:
        lines.append(f"export: {_status(e) or 'not run'}")
    for key in ("tokenizer", "baseline", "tokenizer_reference"):
        part = res.get(key)
        if part is None:
            continue
        if _status(part):
            lines.append(f"{key}: {_status(part)}")
        elif key == "tokenizer":
            lines.append(f"tokenizer, {part['vocab']:,} tokens: hf.tokenizer {part['ours_s']:.2f} s (CPU "
                         f"{part['ours_cpu_s']:.2f} s; the process's first {part['ours_first_s']:.2f} s; target <= "
                         f"{part['target_s']:g} s)")
        elif key == "baseline":
            lines.append(f"{part.get('file', part['params'] + ' file')}: export {part['ours_s']:.2f} s, "
                         f"transformers from_pretrained + "
                         f"save_pretrained {part['transformers_s']:.1f} s ({part['speedup']:.0f}x); "
                         f"{part['bit_identical_tensors']} of {part['tensors']} tensors bit-identical (no tokenizer "
                         "written by either)")
        else:
            lines.append(f"tokenizer, {part['vocab']:,} tokens: AutoTokenizer(gguf_file=) {part['transformers_s']:.1f} s, "
                         f"hf.tokenizer {part['ours_s']:.2f} s ({part['speedup']:.0f}x); same ids: {part['same_ids']}, "
                         f"same tokenizer.json: {part['same_backend']}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m gguf_gpu_lab.tools.bench_export [--model PATH] [--params 8B] ...
    import argparse

    p = argparse.ArgumentParser(prog="python -m gguf_gpu_lab.tools.bench_export")
    p.add_argument("--phase", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--model")
    p.add_argument("--params", default="8B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", default="2GB")
    p.add_argument("--work-dir", default=".", help="the export and the disk's run write here (then delete)")
    p.add_argument("--baseline-params", default="1B",
                   help="transformers' comparison on a synthetic file of this size ('same': the benchmark's own file; "
                        "'none' skips it)")
    p.add_argument("--tokenizer-vocab", type=int, default=262144, help="0 skips the tokenizer timing")
    p.add_argument("--reference-vocab", type=int, default=None,
                   help="transformers' own tokenizer timed on this vocabulary (default: --tokenizer-vocab)")
    p.add_argument("--time-limit", type=float, default=200.0, help="seconds for the whole run (default 200)")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args()
    if a.phase:
        phase_args = json.loads(a.phase[1])
        if phase_args.get("_stacks_after_s"):
            import faulthandler

            faulthandler.dump_traceback_later(phase_args["_stacks_after_s"], exit=False)
        print(json.dumps(_PHASES[a.phase[0]](phase_args)))
        sys.exit(0)
    saved = []
    r = bench_export(a.model, a.params, dtype=a.dtype, device=a.device, budget=a.budget, work_dir=a.work_dir,
                     baseline_params=None if a.baseline_params.lower() == "none" else a.baseline_params,
                     tokenizer_vocab=a.tokenizer_vocab or None, time_limit=a.time_limit,
                     reference_vocab=a.reference_vocab, save=lambda res: saved.append(save_progress(res, a.out_dir, saved)))
    print(format_export(r))
    print(f"saved {saved[-1]}")
