"""Command line: argument parsing only; the work is done by the library's functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import GGUFLabError
from .outputs import check_new, claim_folder, record_folder, writable_folder
from .progress import ProgressBar, progress_bar

BENCH_DIR = "gguf-lab-bench"  # under the working directory; the committed results are benchmarks/results
CHUNK_MB = (1 / 64, 1024.0)  # the range of --chunk-mb (loader.plan.LoadOptions checks the same for the API)
MAX_DEVICE = 1023  # the largest device index --device takes (a backend checks against its own devices)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the flag and the value, where to find the options)
    instead of the whole usage; the sub-commands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` (to ``high``); argparse names the flag."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < low or (high is not None and n > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {n}")
        return n
    return parse


def _between(low: float, high: float):
    """An argparse type: a number from ``low`` to ``high`` (nan and inf refused as outside)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= x <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, got {text}")
        return x
    return parse


def _devices(text: str):
    """An argparse type for --device: an index, indices joined by commas, or "all"."""
    if text == "all":
        return "all"
    try:
        ds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an index, indices such as 0,1, or all; got {text!r}") from None
    if any(not 0 <= d <= MAX_DEVICE for d in ds):
        raise argparse.ArgumentTypeError(f"device indices are from 0 to {MAX_DEVICE}, got {text!r}")
    return ds[0] if len(ds) == 1 else ds


def _writable_dir(path: str, flag: str) -> None:
    """Create ``path`` and check that it takes files, before the work whose results go there."""
    writable_folder(path, f"{flag} {path}")


def _os_error(e: OSError) -> str:
    """An OSError on one line, never empty (some carry neither errno nor file name)."""
    if e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
    return str(e) or type(e).__name__


def _show_value(key: str, v) -> str:
    """A metadata value on one line: the file type named, long or multi-line strings shortened
    with their length (``--json`` keeps them whole)."""
    if key == "general.file_type" and isinstance(v, int):
        from gguf import LlamaFileType

        try:
            return f"{v} ({LlamaFileType(v).name})"
        except ValueError:
            return f"{v} (not a llama.cpp file type)"
    if isinstance(v, str) and (len(v) > 80 or "\n" in v):
        return f"{v[:60]!r}... ({len(v):,} characters, {v.count(chr(10)) + 1} lines)"
    return str(v)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    return str(o)


def cmd_inspect(path: str, as_json: bool, tensors: bool) -> int:
    from .model import _fmt_bytes, open_model

    with open_model(path, warmup=False) as m:
        s = m.summary()
        if as_json:
            doc = {k: v for k, v in s.items() if k not in ("by_type", "by_layer")}
            doc["by_type"] = {t: {k: int(v) for k, v in r.items()} for t, r in s["by_type"].iterrows()}
            doc["metadata"] = m.metadata
            if tensors:
                doc["tensors"] = m.tensors_df().astype({"layer": "object"}).to_dict(orient="records")
            print(json.dumps(doc, indent=2, default=_json_default))
            return 0
        print(f"{m.path}: GGUF v{m.version}, {s['architecture']}, {s['n_tensors']} tensors, "
              f"{s['n_elements'] / 1e6:.1f} M weights, {_fmt_bytes(s['file_size'])}, "
              f"{s['bits_per_weight']:.2f} bits/weight")
        print("\nmetadata:")
        for k, v in m.metadata.items():
            print(f"  {k} = {_show_value(k, v)}")
        print("\nby type:")
        print(s["by_type"].to_string())
        if tensors:
            import pandas as pd

            with pd.option_context("display.max_rows", None, "display.width", 200):
                print("\ntensors (ggml_shape: GGUF order, fastest-varying dimension first; np_shape: NumPy order, "
                      "as dequant and load give the arrays):")
                df = m.tensors_df().rename(columns={"shape": "ggml_shape"})
                print(df.to_string(index=False))
    return 0


def cmd_synth(out: str, params: str, mix: str, seed: int, vocab: int | None = None, arch: str = "llama",
              heads: int | None = None, kv_heads: int | None = None, weights: str = "random",
              overwrite: bool = False) -> int:
    from .tools.synth import synth

    bar = ProgressBar(f"synth {arch} {params} {mix}")
    try:
        r = synth(out, params, mix, seed, vocab=vocab, progress=bar, arch=arch, heads=heads, kv_heads=kv_heads,
                  weights=weights, overwrite=overwrite)
    finally:
        bar.close()
    print(f"wrote {r.path}: {r.n_tensors} tensors, {r.n_params / 1e6:.1f} M weights, "
          f"{r.file_size / 1e6:.1f} MB in {r.seconds:.2f} s ({r.mb_per_s:.0f} MB/s)")
    return 0


def cmd_dequant(path: str, name: str, out: str | None, dtype: str, verify: bool, bf16_bits: bool = False,
                overwrite: bool = False) -> int:
    import numpy as np

    from .model import open_model

    if bf16_bits and dtype != "bfloat16":
        raise GGUFLabError(f"--bf16-bits needs --dtype bfloat16, got --dtype {dtype}")
    if out is not None:  # before the work; np.save would add .npy to any other name
        if not out.endswith(".npy"):
            raise GGUFLabError(f"--out {out}: the file is a NumPy .npy file; give a name ending in .npy")
        check_new(out, overwrite, "--out file")
    with open_model(path, warmup=False) as m:
        t = m.info(name)
        x = m.dequantize(name, dtype)
        print(f"{name}: {t.type_name}, NumPy shape {t.np_shape} (GGUF order {t.shape}) -> {x.dtype} "
              f"min {float(x.min()):.6g} max {float(x.max()):.6g} mean {float(x.astype(np.float32).mean()):.6g}")
        if verify:
            from .tools.verify import verify_tensor

            ok, msg = verify_tensor(m, name)
            print(msg)
            if not ok:
                return 1
        if out:
            if dtype == "bfloat16":  # .npy has no bfloat16 (np.load would give void |V2): exact float32, or the bits
                x = x.view(np.uint16) if bf16_bits else x.astype(np.float32)
            with open(out, "wb" if overwrite else "xb") as f:  # exactly the name given
                np.save(f, x)
            print(f"saved {out} ({x.dtype})")
    return 0


def cmd_check(path: str, max_problems: int) -> int:
    from .model import open_model

    with open_model(path, warmup=False) as m:
        problems = m.check(max_problems=max_problems)
    for p in problems:
        print(p)
    if problems:
        print(f"{path}: {len(problems)} problem(s) found")
        return 1
    print(f"{path}: ok, no NaN or Inf in float tensors or block scales")
    return 0


def cmd_bench(cpu: bool, dequant: bool, out_dir: str, size_mb: int | None, types: list[str] | None,
              model_path: str | None = None, params: str = "8B", open_: bool = False, e2e: bool = False,
              hf: bool = False, multi_gpu: bool = False, out: str | None = None, big_params: str | None = "70B",
              export: bool = False, overwrite: bool = False, tp: bool = False,
              tp_worlds: Sequence[int] = (1, 2, 4), tp_device: str = "auto", first: bool = False,
              remote: bool = False, connections: int = 16, rate_gbps: float = 1.0) -> int:
    from .tools import bench

    chosen = [flag for flag, on in (("--cpu", cpu), ("--dequant", dequant), ("--open", open_), ("--e2e", e2e),
                                    ("--hf", hf), ("--multi-gpu", multi_gpu), ("--export", export), ("--tp", tp),
                                    ("--first", first), ("--remote", remote)) if on]
    if len(chosen) > 1:
        raise GGUFLabError(f"choose one benchmark: --cpu, --dequant, --open, --e2e, --hf, --multi-gpu, --export, --tp, "
                           f"--first, --remote, or none (the loader); got {' '.join(chosen)}")
    for flag, value in (("--size-mb", size_mb), ("--types", types)):
        if value is not None and not (cpu or dequant):
            raise GGUFLabError(f"{flag} is for bench --cpu and bench --dequant, not bench{' ' + chosen[0] if chosen else ''}")
    size_mb = 256 if size_mb is None else size_mb
    if not cpu and not open_ and not export and not tp:  # before the loader benchmark writes its model (4.6 GiB for 8B)
        from .device import _cupy_or_reason

        reason = _cupy_or_reason()[1]
        if reason is not None:
            raise GGUFLabError(f"bench{' ' + chosen[0] if chosen else ''} needs a GPU: {reason}; "
                               "bench --cpu and bench --open run without one")
    if out is not None:
        check_new(out, overwrite, "--out file")
    else:
        _writable_dir(out_dir, "--out-dir")
    if tp:
        from .tools.bench_tp import bench_tp, format_tp

        res = bench_tp(model_path, params="25M" if params == "8B" and model_path is None else params,
                       worlds=tp_worlds, device=tp_device)
        print(format_tp(res))
    elif first:
        from .tools.bench_first import bench_first, format_first

        res = bench_first(model_path, params=params)
        print(format_first(res))
    elif remote:
        from .tools.bench_remote import bench_remote, format_remote

        res = bench_remote(model_path, params=params, connections=connections, rate_gbps=rate_gbps)
        print(format_remote(res))
    elif multi_gpu:
        from .tools.bench_multi import bench_multi, format_multi

        res = bench_multi(model_path, params=params, big_params=big_params)
        print(format_multi(res))
    elif open_:
        from .tools.bench_e2e import bench_open, format_open

        res = bench_open()
        print(format_open(res))
    elif e2e:
        from .tools.bench_e2e import bench_e2e, format_e2e

        res = bench_e2e(model_path, params=params)
        print(format_e2e(res))
    elif export:
        from .tools.bench_export import bench_export, format_export

        res = bench_export(model_path, params=params, work_dir=out_dir)
        print(format_export(res))
    elif hf:
        from .tools.bench_hf import bench_hf, format_hf

        res = bench_hf(model_path, params=params)
        print(format_hf(res))
    elif not cpu and not dequant:
        from .tools.bench_load import bench_load, format_load

        res = bench_load(model_path, params=params)
        print(format_load(res))
    elif cpu:
        res = bench.bench_cpu(types=types, weights=size_mb * (1 << 20) // 4)
        print(bench.format_cpu(res))
    else:
        from .tools.bench_gpu import bench_gpu_dequant, format_gpu_dequant

        res = bench_gpu_dequant(types=types, n_elements=size_mb * (1 << 20) // 2)
        print(format_gpu_dequant(res))
    if out is not None:
        with open(out, "w" if overwrite else "x") as f:
            json.dump(res, f, indent=2, default=_json_default)
        path = out
    else:
        path = bench.save_result(res, out_dir, res["benchmark"])
    print(f"saved {path}")
    return 0


PROFILE_FILES = ("spans.csv", "timeline.png", "trace.json")  # what write_profile puts in a folder


def cmd_load(path: str, mode: str, dtype: str, streams: int, chunk_mb: float, readers: int, order: str,
             backend: str, profile_dir: str | None, repeat: int = 1, device=0, overwrite: bool = False) -> int:
    from .loader import load
    from .model import open_model
    from .plots import write_profile

    if profile_dir:
        _writable_dir(profile_dir, "--profile")
        claim_folder(profile_dir, PROFILE_FILES, overwrite)
    with open_model(path) as m:
        for i in range(repeat):
            # the first load in a process also pins the staging ring and grows the device pool;
            # later ones reuse both, as a process that loads often would
            r = load(m, mode=mode, dtype=dtype, streams=streams, chunk_mb=chunk_mb, readers=readers, order=order,
                     backend=backend, progress=True, device=device)
            which = f"load {i + 1} of {repeat}: " if repeat > 1 else ""
            where = "in host memory (host backend)" if r.backend == "host" else "on the device"
            print(f"{which}loaded {len(r)} tensors ({r.file_bytes / 1e9:.3f} GB of file, {r.out_bytes / 1e9:.3f} GB "
                  f"{where}) in {r.wall_s:.3f} s: {r.gb_s:.2f} GB/s, mode {mode}, backend {r.backend}")
            if i < repeat - 1:
                del r
        if r.place is not None:
            print(f"placement over devices {', '.join(map(str, r.devices))}:")
            print(r.device_summary().to_string(index=False))
        if r.profile is not None:
            print(r.profile.stage_summary().to_string(index=False))
            if profile_dir:
                for what, p in write_profile(r.profile, profile_dir).items():
                    print(f"{what}: {p}")
                record_folder(profile_dir, PROFILE_FILES)
    return 0


def cmd_fuzz(cases: int, seed: int, out: str | None, overwrite: bool = False) -> int:
    from .tools import fuzz
    from .tools.bench import machine_info

    if out:  # before the work
        check_new(out, overwrite, "--out file")
    bar = progress_bar("fuzz", total=cases, unit="case")
    try:
        rep = fuzz.run(cases, seed, progress=lambda i: bar.update(1))
    finally:
        bar.close()
    print(f"{rep.cases} cases: " + ", ".join(f"{k} {v}" for k, v in rep.outcomes.most_common())
          + f"; slowest {rep.slowest_s:.3f} s; peak traced memory {rep.peak_bytes / 2**20:.1f} MiB")
    for f in rep.failures[:20]:
        print(f"FAILED case {f[0]} ({f[1]}): {f[2]}")
    if out:
        doc = {"benchmark": "fuzz", "machine": machine_info(), "seed": seed, **rep.to_dict()}
        with open(out, "w" if overwrite else "x") as fh:
            json.dump(doc, fh, indent=2)
        print(f"saved {out}")
    return 0 if rep.ok() else 1


def cmd_export(path: str, out_dir: str, dtype: str, max_shard_size: str, overwrite: bool, budget: str,
               device: str) -> int:
    from .hf import export

    r = export(path, out_dir, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, budget=budget,
               device=device)
    print(f"wrote {r.out_dir}: {r.n_tensors} tensors ({dtype}) in {len(r.files)} files, {r.weight_bytes / 1e9:.3f} GB "
          f"of safetensors in {r.wall_s:.2f} s ({r.gb_s:.2f} GB/s)")
    return 0


def cmd_demo(out_dir: str, params: str, mix: str, overwrite: bool = False) -> int:
    from .tools.demo import run_demo

    run_demo(out_dir, params=params, mix=mix, progress=progress_bar, overwrite=overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gguf-gpu-lab", description="Load GGUF models onto a GPU fast, and see how.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="show a model's metadata and bytes by tensor type (--tensors: every tensor)")
    s.add_argument("path", help="GGUF model file")
    s.add_argument("--json", action="store_true", help="machine-readable output (metadata values in full)")
    s.add_argument("--tensors", action="store_true", help="also list every tensor: type, shape, bytes, offset, layer")

    s = sub.add_parser("synth", help="write a synthetic model (llama-shaped, or --arch)")
    s.add_argument("out", help="output .gguf path")
    s.add_argument("--params", default="25M", help="size: 25M, 1B, 7B, ... (default 25M)")
    s.add_argument("--mix", default="Q4_K_M", help="Q4_0, Q8_0, Q4_K_M, Q6_K, F16 or all-types (default Q4_K_M)")
    s.add_argument("--seed", type=_whole(0, 2**32 - 1), default=0, help="the same seed writes the same bytes (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace a file at OUT (refused by default)")
    s.add_argument("--vocab", type=_whole(1, 1 << 24), default=None,
                   help="vocabulary size: token list, scores and types, embedding rows (default: the size's own)")
    s.add_argument("--arch", default="llama",
                   help="architecture: llama, mistral, qwen2, qwen3, gemma2, gemma3 or phi3 (default llama)")
    s.add_argument("--heads", type=_whole(1, 4096), default=None, help="attention heads (default: the size's own)")
    s.add_argument("--kv-heads", type=_whole(1, 4096), default=None,
                   help="key/value heads (default: as many as --heads)")
    s.add_argument("--weights", default="random", choices=["random", "small"],
                   help="small: weights the size a trained model's are (finite float16 forward passes)")

    s = sub.add_parser("dequant", help="dequantize one tensor on the CPU")
    s.add_argument("path", help="GGUF model file")
    s.add_argument("name", help="tensor name, as inspect --tensors lists it (e.g. blk.0.attn_q.weight)")
    s.add_argument("--out", help="save as .npy; bfloat16 is saved as its exact float32 values, since NumPy has "
                                 "no bfloat16 (see --bf16-bits)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="output dtype (default float32); float16 and bfloat16 are rounded to nearest even")
    s.add_argument("--bf16-bits", action="store_true",
                   help="with --dtype bfloat16: save the bfloat16 bit patterns as uint16 instead of float32 values")
    s.add_argument("--verify", action="store_true", help="compare with gguf-py's dequantize")
    s.add_argument("--overwrite", action="store_true", help="replace a file at --out (refused by default)")

    s = sub.add_parser("load", help="load a model onto the GPU (or the host backend) and report")
    s.add_argument("path", help="GGUF model file")
    s.add_argument("--mode", default="gpu", choices=["gpu", "raw", "cpu", "sequential"],
                   help="gpu: upload quantized bytes, dequantize on the device; raw: upload and keep them quantized; "
                        "cpu: dequantize on the CPU, then upload; sequential: one tensor at a time (default gpu)")
    s.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"],
                   help="dtype of the loaded tensors (default float16; not used by --mode raw)")
    s.add_argument("--streams", type=_whole(1, 64), default=4, help="streams the chunks are spread over, 1 to 64 (default 4)")
    s.add_argument("--chunk-mb", type=_between(*CHUNK_MB), default=16.0,
                   help=f"MiB of file per chunk, {CHUNK_MB[0]:g} to {CHUNK_MB[1]:g}: big tensors are split, small "
                        "ones batched (default 16)")
    s.add_argument("--readers", type=_whole(1, 256), default=None,
                   help="reader threads (default: two fewer than the cores, 2 to 14)")
    s.add_argument("--order", default="file", choices=["file", "largest", "layer"],
                   help="the order tensors are loaded in (default file)")
    s.add_argument("--backend", default="auto", choices=["auto", "cupy", "host"],
                   help="cupy (a GPU), host (NumPy, no GPU) or auto: cupy where a GPU is usable (default auto)")
    s.add_argument("--device", type=_devices, default=0,
                   help="the GPU (default 0), or several: 0,1 or all, the model split by layer in proportion to "
                        "each GPU's free memory (the placement is printed; the host backend plays several devices)")
    s.add_argument("--profile", metavar="DIR", help="write the spans (CSV), the timeline (PNG) and a Chrome trace (JSON) here")
    s.add_argument("--overwrite", action="store_true",
                   help="with --profile: replace files of those names that gguf-gpu-lab did not write there")
    s.add_argument("--repeat", type=_whole(1, 1000), default=1,
                   help="load N times, each reported (the first also pins the staging ring and grows the device "
                        "pool); the profile is the last load's")

    s = sub.add_parser("check", help="scan for NaN/Inf in float tensors and block scales (exit 1 if found)")
    s.add_argument("path", help="GGUF model file")
    s.add_argument("--max-problems", type=_whole(1, 10**9), default=100, help="stop after this many problems (default 100)")

    s = sub.add_parser("bench", help="run a benchmark (default: the loader on the GPU) and save its JSON result")
    s.add_argument("--cpu", action="store_true", help="CPU dequantization throughput (needs no GPU)")
    s.add_argument("--dequant", action="store_true", help="GPU dequantization throughput against a device copy")
    s.add_argument("--open", action="store_true", dest="open_",
                   help="open_model on a 262,144-token vocabulary and on an 8B header, against gguf-py's reader "
                        "(needs no GPU)")
    s.add_argument("--e2e", action="store_true",
                   help="open + load + synchronize in fresh processes (first) and again (steady), gpu and raw "
                        "modes, against transformers' from_pretrained(gguf_file=...) where it is installed")
    s.add_argument("--hf", action="store_true",
                   help="hf.from_gguf against transformers' from_pretrained(gguf_file=...) and load() (needs the hf extra)")
    s.add_argument("--multi-gpu", action="store_true",
                   help="every GPU of the host in one run: pinned H2D alone and together, the page-cache copy "
                        "ceiling while all copy, one GPU against all on the 8B file, and a 70B Q4_K_M file (~40 GB, "
                        "written and deleted) to float16 over all GPUs, sampled tensors checked against gguf-py")
    s.add_argument("--export", action="store_true",
                   help="hf.export of the model to bfloat16 safetensors (written in --out-dir, then deleted) against "
                        "the disk's sequential write speed measured in the same run, peak host memory, transformers' "
                        "from_pretrained(gguf_file=...) + save_pretrained on a 1B file, and the tokenizer of a "
                        "262,144-token vocabulary against transformers' (the GPU where there is one)")
    s.add_argument("--tp", action="store_true",
                   help="tensor-parallel hf.from_gguf under torchrun for worlds 1, 2, 4: per-rank bytes read and load "
                        "time (host backend with gloo, or the GPUs with NCCL where there are two or more; needs the hf "
                        "extra; default model: a synthetic 25M Q4_K_M llama)")
    s.add_argument("--tp-worlds", type=_whole(1, 64), nargs="+", default=[1, 2, 4],
                   help="--tp: the world sizes (default 1 2 4)")
    s.add_argument("--tp-device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="--tp: 'cuda' (NCCL), 'cpu' (gloo) or 'auto' (the GPUs where there are two or more)")
    s.add_argument("--first", action="store_true",
                   help="the first minute in Jupyter kernels (nbclient): a bar's cost on the big and a ~20 MB file, the "
                        "first load 1 s after open and with no pause, the kernel's first bar, a warm load's first copy; "
                        "from_gguf's first call and transformers' import apart (fresh processes)")
    s.add_argument("--remote", action="store_true",
                   help="load over HTTP from a local server against its raw ranged transfer of the same bytes with "
                        "the same connections, unthrottled and at --rate-gbps, and against the local load")
    s.add_argument("--connections", type=_whole(1, 256), default=16,
                   help="--remote: connections (reader threads), 1-256 (default 16)")
    s.add_argument("--rate-gbps", type=_between(0.001, 1000), default=1.0,
                   help="--remote: the throttled server's GB/s, 0.001-1000 (default 1)")
    s.add_argument("--big-params", default="70B",
                   help="--multi-gpu: the large model loaded over all GPUs (default 70B; 'none' skips it)")
    s.add_argument("--out", help="write the JSON result to this file (default: a file named by date and time in "
                                 "--out-dir)")
    s.add_argument("--overwrite", action="store_true", help="replace a file at --out (refused by default)")
    s.add_argument("--model", help="loader, --e2e, --hf, --export and --first benchmarks: this model (default: a synthetic one of --params)")
    s.add_argument("--params", default="8B", help="loader, --e2e, --hf, --export and --first benchmarks: synthetic model size (default 8B, "
                                                  "~4.6 GiB Q4_K_M)")
    s.add_argument("--out-dir", default=BENCH_DIR,
                   help=f"folder for the JSON result (default: {BENCH_DIR}/ under the working directory)")
    s.add_argument("--size-mb", type=_whole(1, 65536), default=None,
                   help="--cpu and --dequant: output size per type, float32 MB for --cpu, float16 MiB for --dequant, "
                        "1 to 65536 (default 256)")
    s.add_argument("--types", nargs="*", help="--cpu and --dequant: GGML types (default: Q4_0 Q8_0 Q4_K Q6_K for --cpu, "
                                              "every type for --dequant)")

    s = sub.add_parser("export", help="write a Hugging Face model folder (safetensors, config, tokenizer) of a GGUF "
                                      "file, for any engine that reads one (needs the hf extra)")
    s.add_argument("path", help="GGUF model file (an architecture hf supports)")
    s.add_argument("out_dir", help="folder to write: new or empty, unless --overwrite")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of every tensor written (default bfloat16)")
    s.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file: KB, MB, GB or TB (10^9 bytes a GB), 1KB to 10TB (default 5GB)")
    s.add_argument("--budget", default="2GB",
                   help="host memory the weights may take at once, 1KB to 10TB (default 2GB)")
    s.add_argument("--device", default="auto",
                   help="auto (the GPU where there is one, else the host backend), cuda, cuda:N or cpu (default auto)")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder, replacing the export's files there (others stay)")

    s = sub.add_parser("fuzz", help="fuzz the parser and CPU load path with mutated GGUF files (exit 1 on a failure)")
    s.add_argument("--cases", type=_whole(1, 10**7), default=10000, help="how many mutated files (default 10000)")
    s.add_argument("--seed", type=_whole(0, 2**32 - 1), default=0, help="the same seed gives the same cases (default 0)")
    s.add_argument("--out", help="save the counts as JSON")
    s.add_argument("--overwrite", action="store_true", help="replace a file at --out (refused by default)")

    s = sub.add_parser("demo", help="the main job on a built-in synthetic model")
    s.add_argument("--out-dir", default="gguf-lab-demo", help="folder for the model, spans, timeline and trace "
                                                              "(default gguf-lab-demo)")
    s.add_argument("--params", default="25M", help="size of the synthetic model (default 25M)")
    s.add_argument("--mix", default="Q4_K_M", help="quantization mix, as for synth (default Q4_K_M)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace files of the demo's names in --out-dir that gguf-gpu-lab did not write there "
                        "(its own from an earlier run are replaced without it)")
    return p


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail a second time."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return cmd_inspect(args.path, args.json, args.tensors)
        if args.command == "synth":
            return cmd_synth(args.out, args.params, args.mix, args.seed, args.vocab, args.arch, args.heads,
                             args.kv_heads, args.weights, args.overwrite)
        if args.command == "dequant":
            return cmd_dequant(args.path, args.name, args.out, args.dtype, args.verify, args.bf16_bits, args.overwrite)
        if args.command == "load":
            return cmd_load(args.path, args.mode, args.dtype, args.streams, args.chunk_mb, args.readers, args.order,
                            args.backend, args.profile, args.repeat, args.device, args.overwrite)
        if args.command == "check":
            return cmd_check(args.path, args.max_problems)
        if args.command == "bench":
            return cmd_bench(args.cpu, args.dequant, args.out_dir, args.size_mb, args.types, args.model, args.params,
                             args.open_, args.e2e, args.hf, args.multi_gpu, args.out,
                             None if args.big_params.lower() == "none" else args.big_params, args.export,
                             args.overwrite, args.tp, tuple(args.tp_worlds), args.tp_device, args.first, args.remote,
                             args.connections, args.rate_gbps)
        if args.command == "export":
            return cmd_export(args.path, args.out_dir, args.dtype, args.max_shard_size, args.overwrite, args.budget,
                              args.device)
        if args.command == "fuzz":
            return cmd_fuzz(args.cases, args.seed, args.out, args.overwrite)
        if args.command == "demo":
            return cmd_demo(args.out_dir, args.params, args.mix, args.overwrite)
    except (GGUFLabError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gguf-gpu-lab: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went (`inspect ... | head -1`): stop quietly, as CLI tools do
        _quiet_stdout()
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE
    except OSError as e:
        print(f"gguf-gpu-lab: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gguf-gpu-lab: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
