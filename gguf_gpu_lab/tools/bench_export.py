"""``hf.export`` against the disk it writes to, in the same run: the disk's sequential write speed
(the export's own pattern: one thread writing large pieces into preallocated files, then fsync),
the export's wall time of the same file (a synthetic 8B Q4_K_M to bfloat16 by default), the ratio
of the two (target at least 0.8), and the export process's peak host memory (target at most the
budget + 1 GB). Also transformers' ``from_pretrained(gguf_file=...)`` + ``save_pretrained`` on a
smaller file (it takes minutes on 8B), and ``hf.tokenizer`` on a 262,144-token vocabulary against
transformers' ``AutoTokenizer.from_pretrained(gguf_file=...)``.

The export runs in a child process, so that its peak memory (``ru_maxrss``) is its own, after a
warm-up that imports transformers' model modules and maps the names (what a process's first export
adds, reported apart): the timed export is what every later one in a process costs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .bench import bench_model, machine_info, package_version, save_result

TEXT = "The capital of France is Paris; \u00e9t\u00e9, \u4e2d\u6587, <tok100> and   spaces."


def disk_write_speed(folder: str, nbytes: int, piece: int = 64 << 20, file_size: int = 5 * 10**9) -> dict:
    """Write ``nbytes`` of random data into files of at most ``file_size`` bytes (preallocated with
    ftruncate, written front to back in ``piece``-byte pwrites by one thread, as the export writes
    its shards), fsync them, and delete them: GB/s of the whole."""
    import numpy as np

    buf = memoryview(np.random.default_rng(0).integers(0, 256, piece, dtype=np.uint8)).cast("B")
    paths = []
    t0 = time.perf_counter()
    try:
        left, k = nbytes, 0
        while left > 0:
            size = min(left, file_size)
            path = os.path.join(folder, f"disk-speed-{k}.bin")
            paths.append(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, size)
                pos = 0
                while pos < size:
                    n = min(piece, size - pos)
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, buf[done:n], pos + done)
                    pos += n
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
    return {"bytes": nbytes, "seconds": seconds, "write_gb_s": nbytes / seconds / 1e9, "piece_bytes": piece}


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(args: dict) -> dict:
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
    return {"wall_s": r.wall_s, "steps_s": r.steps_s, "weight_bytes": r.weight_bytes, "gb_s": r.gb_s,
            "n_tensors": r.n_tensors, "files": list(r.files), "rss_before_bytes": before, "first_call_extra_s": warmup,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _run_child(args: dict, timeout: float = 3600) -> dict:
    env = dict(os.environ, GGUF_LAB_PROGRESS="0")
    p = subprocess.run([sys.executable, "-m", "gguf_gpu_lab.tools.bench_export", "--child", json.dumps(args)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"the export's child process failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _same_safetensors(a: str, b: str) -> dict:
    """Every tensor of folder ``a`` against folder ``b``, byte for byte."""
    import torch
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), framework="pt") as f:
                    out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    same = sum(1 for k in tb if k in ta and ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
               and torch.equal(ta[k].contiguous().view(-1).view(torch.uint8), tb[k].contiguous().view(-1).view(torch.uint8)))
    return {"tensors": len(tb), "bit_identical_tensors": same, "same_names": ta.keys() == tb.keys()}


def _baseline(work: str, params: str, dtype: str, device: str, vocab: int | None) -> dict:
    """Ours and transformers' ``from_pretrained(gguf_file=...)`` + ``save_pretrained`` on a smaller file."""
    import torch
    from transformers import AutoModelForCausalLM

    from .. import hf
    from .synth import synth

    path = os.path.join(work, f"baseline-{params}.gguf")
    synth(path, params, "Q4_K_M", vocab=vocab, weights="small")
    t0 = time.perf_counter()
    hf.export(path, os.path.join(work, "ours"), dtype=dtype, device=device, progress=False)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(work, gguf_file=os.path.basename(path), dtype=getattr(torch, dtype))
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
    res = {"params": params, "file_bytes": os.path.getsize(path), "ours_s": ours, "transformers_s": theirs,
           "save_pretrained_refused": detached,
           "speedup": theirs / ours, **same,
           "bit_identical": same["same_names"] and same["bit_identical_tensors"] == same["tensors"]}
    for sub in ("ours", "transformers"):
        shutil.rmtree(os.path.join(work, sub))
    os.unlink(path)
    return res


def _tokenizer_timing(work: str, vocab: int, repeat: int = 3) -> dict:
    from transformers import AutoTokenizer

    from .. import hf
    from .synth import synth

    path = os.path.join(work, f"vocab-{vocab}.gguf")
    synth(path, "1M", "Q8_0", vocab=vocab, data=False)
    t0 = time.perf_counter()
    ours = hf.tokenizer(path)
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ours = hf.tokenizer(path)
        runs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = AutoTokenizer.from_pretrained(work, gguf_file=os.path.basename(path))
    theirs = time.perf_counter() - t0
    os.unlink(path)
    steady = statistics.median(runs)
    return {"vocab": vocab, "ours_first_s": first, "ours_s": steady, "ours_all_s": runs, "transformers_s": theirs,
            "speedup": theirs / steady, "same_ids": ours(TEXT)["input_ids"] == ref(TEXT)["input_ids"],
            "same_backend": ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()}


def bench_export(model_path: str | None = None, params: str = "8B", mix: str = "Q4_K_M", dtype: str = "bfloat16",
                 device: str = "auto", budget: str = "2GB", work_dir: str = ".", baseline_params: str | None = "1B",
                 vocab: int | None = None, tokenizer_vocab: int | None = 262144) -> dict:
    """The export of ``model_path`` (or a synthetic llama of ``params`` and ``mix``) into a temporary
    folder under ``work_dir``, against that disk's write speed; ``baseline_params`` (None skips it)
    and ``tokenizer_vocab`` (None skips it) size the comparisons with transformers.

    Example:
        >>> res = bench_export(params="8B")      # doctest: +SKIP
        >>> print(format_export(res))            # doctest: +SKIP
    """
    import torch

    from .. import hf_convert
    from ..export import _device_for, parse_size
    from ..model import shared_model

    dev, _, _ = _device_for(device)
    budget_bytes = parse_size(budget, "budget")
    os.makedirs(work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gguf-lab-bench-export-", dir=work_dir) as work, \
            bench_model(model_path, params, mix, arch="llama", weights="small",
                        **({"vocab": vocab} if vocab else {})) as (path, synth_info):
        info = {"device": str(dev)}
        if dev.type == "cuda":
            from .bench_gpu import device_info

            info = device_info()
        res = {"benchmark": "export", "machine": machine_info(), "device": info, "torch": torch.__version__,
               "transformers": package_version("transformers"), "safetensors": package_version("safetensors"), "dtype": dtype,
               "budget_bytes": budget_bytes,
               "model": {"path": os.path.basename(path), "file_bytes": os.path.getsize(path), "synth": synth_info},
               "targets": {"vs_disk_at_least": 0.8, "peak_rss_at_most_bytes": budget_bytes + 10**9}}
        conv = hf_convert._Conversion(shared_model(path), dtype)  # the export's size, for the disk's run
        size = 2 if dtype != "float32" else 4
        nbytes = sum(p.numel() for n, p in conv.hf_model.state_dict().items()
                     if n in set(conv.names[g] for g in conv.wanted)) * size
        del conv
        _say(f"the disk's sequential write speed: {nbytes / 1e9:.1f} GB into {work}")
        res["disk"] = disk_write_speed(work, nbytes)
        _say(f"disk {res['disk']['write_gb_s']:.2f} GB/s; the export, in a child process")
        res["export"] = _run_child({"path": path, "out": os.path.join(work, "export"), "dtype": dtype,
                                    "budget": budget_bytes, "device": str(dev)})
        res["export"]["disk_bytes_estimate"] = nbytes
        res["ratio_to_disk"] = res["export"]["gb_s"] / res["disk"]["write_gb_s"]
        res["ratio_to_disk_weights_only"] = (res["export"]["weight_bytes"] / res["export"]["steps_s"]["weights_s"]
                                             / 1e9 / res["disk"]["write_gb_s"])
        shutil.rmtree(os.path.join(work, "export"))
        _say(f"export {res['export']['gb_s']:.2f} GB/s")
        if baseline_params:
            _say(f"transformers' from_pretrained(gguf_file=...) + save_pretrained on {baseline_params}")
            res["baseline"] = _baseline(work, baseline_params, dtype, str(dev), vocab)
        if tokenizer_vocab:
            _say(f"the tokenizer of a {tokenizer_vocab:,}-token vocabulary, ours and transformers'")
            res["tokenizer"] = _tokenizer_timing(work, tokenizer_vocab)
        res["meets_targets"] = {
            "vs_disk": res["ratio_to_disk"] >= res["targets"]["vs_disk_at_least"],
            "peak_rss": res["export"]["peak_rss_bytes"] <= res["targets"]["peak_rss_at_most_bytes"]}
        return res


def _say(what: str) -> None:
    """A phase of the benchmark on stderr as it starts, so a run stopped by a time limit shows where."""
    print(f"bench --export: {what}", file=sys.stderr, flush=True)


def format_export(res: dict) -> str:
    d, e, k = res["device"], res["export"], res["disk"]
    lines = [f"export on {d.get('name', d.get('device'))} ({res['machine']['date']}): {res['model']['path']}, "
             f"{res['model']['file_bytes'] / 1e9:.2f} GB, to {res['dtype']}; torch {res['torch']}, "
             f"transformers {res['transformers']}",
             f"disk, sequential write + fsync   {k['bytes'] / 1e9:.2f} GB in {k['seconds']:.2f} s = {k['write_gb_s']:.2f} GB/s",
             f"export (child process)          {e['weight_bytes'] / 1e9:.2f} GB in {e['wall_s']:.2f} s = {e['gb_s']:.2f} GB/s"
             f" = {res['ratio_to_disk']:.2f} of the disk (target >= {res['targets']['vs_disk_at_least']}); "
             f"weights alone {res['ratio_to_disk_weights_only']:.2f}; a process's first export adds "
             f"{e['first_call_extra_s']:.1f} s (imports, name map)",
             "  steps: " + ", ".join(f"{s[:-2]} {v:.2f} s" for s, v in e["steps_s"].items()),
             f"peak host memory                {e['peak_rss_bytes'] / 1e9:.2f} GB (before the export "
             f"{e['rss_before_bytes'] / 1e9:.2f} GB; target <= {res['targets']['peak_rss_at_most_bytes'] / 1e9:.2f} GB)"]
    if "baseline" in res:
        b = res["baseline"]
        lines.append(f"{b['params']} file: export {b['ours_s']:.2f} s, transformers from_pretrained + save_pretrained "
                     f"{b['transformers_s']:.1f} s ({b['speedup']:.0f}x); {b['bit_identical_tensors']} of "
                     f"{b['tensors']} tensors bit-identical")
    if "tokenizer" in res:
        t = res["tokenizer"]
        lines.append(f"tokenizer, {t['vocab']:,} tokens: hf.tokenizer {t['ours_s']:.2f} s (first {t['ours_first_s']:.2f} s), "
                     f"AutoTokenizer(gguf_file=) {t['transformers_s']:.1f} s ({t['speedup']:.0f}x); same ids: "
                     f"{t['same_ids']}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m gguf_gpu_lab.tools.bench_export [--model PATH] [--params 8B] ...
    import argparse

    p = argparse.ArgumentParser(prog="python -m gguf_gpu_lab.tools.bench_export")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model")
    p.add_argument("--params", default="8B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", default="2GB")
    p.add_argument("--work-dir", default=".", help="the export and the disk's run write here (then delete)")
    p.add_argument("--baseline-params", default="1B", help="transformers' comparison on this size ('none' skips it)")
    p.add_argument("--tokenizer-vocab", type=int, default=262144, help="0 skips the tokenizer timing")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        sys.exit(0)
    r = bench_export(a.model, a.params, dtype=a.dtype, device=a.device, budget=a.budget, work_dir=a.work_dir,
                     baseline_params=None if a.baseline_params.lower() == "none" else a.baseline_params,
                     tokenizer_vocab=a.tokenizer_vocab or None)
    print(format_export(r))
    print(f"saved {save_result(r, a.out_dir, r['benchmark'])}")
