"""Command line: each command calls the library's functions (the parser and the ranges are cli_args.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings
from typing import Sequence

from .cli_args import build_parser
from .errors import GGUFLabError
from .outputs import check_new, claim_folder, record_folder, writable_folder
from .progress import ProgressBar, progress_bar

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
                doc["tensors"] = (m.tensors_df().astype({"layer": "object"}).rename(columns={"shape": "ggml_shape"})
                                  .to_dict(orient="records"))  # named as in the text listing
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
    from .tools.synth import parse_params

    asked = parse_params(params)
    note = (f" (the smallest llama shape synth writes; --params {params} asked for {asked / 1e6:g} M)"
            if r.n_params > 1.5 * asked else "")
    print(f"wrote {r.path}: {r.n_tensors} tensors, {r.n_params / 1e6:.1f} M weights{note}, "
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
        more = " (stopped there: --max-problems)" if len(problems) >= max_problems else ""
        print(f"{path}: {len(problems)} problem(s) found{more}")
        return 1
    print(f"{path}: ok, no NaN or Inf in float tensors or block scales")
    return 0


_HOST_BENCHES = ("--cpu", "--open", "--export", "--tp")  # the benchmarks that run without a GPU


def cmd_bench(cpu: bool, dequant: bool, out_dir: str, size_mb: int | None, types: list[str] | None,
              model_path: str | None = None, params: str | None = None, open_: bool = False, e2e: bool = False,
              hf: bool = False, multi_gpu: bool = False, out: str | None = None, big_params: str | None = "70B",
              export: bool = False, overwrite: bool = False, tp: bool = False,
              tp_worlds: Sequence[int] | None = None, tp_device: str | None = None, first: bool = False,
              remote: bool = False, connections: int | None = None, rate_gbps: float | None = None,
              time_limit: float | None = None) -> int:
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
    for flag, value, bench_flag, on in (("--time-limit", time_limit, "--export", export),
                                        ("--tp-worlds", tp_worlds, "--tp", tp), ("--tp-device", tp_device, "--tp", tp),
                                        ("--connections", connections, "--remote", remote),
                                        ("--rate-gbps", rate_gbps, "--remote", remote)):
        if value is not None and not on:
            raise GGUFLabError(f"{flag} is for bench {bench_flag}, not bench{' ' + chosen[0] if chosen else ''}")
    tp_worlds, tp_device = tuple(tp_worlds or (1, 2, 4)), tp_device or "auto"
    connections, rate_gbps = connections or 16, 1.0 if rate_gbps is None else rate_gbps
    size_mb = 256 if size_mb is None else size_mb
    params = params or ("25M" if tp else "8B")  # --tp: a small model unless --params says otherwise
    if not (cpu or open_ or export or tp):  # before the loader benchmark writes its model (4.6 GiB for 8B)
        from .device import _cupy_or_reason

        reason = _cupy_or_reason()[1]
        if reason is not None:
            raise GGUFLabError(f"bench{' ' + chosen[0] if chosen else ''} needs a GPU: {reason}; "
                               f"bench {', '.join(_HOST_BENCHES[:-1])} and {_HOST_BENCHES[-1]} run without one")
    if out is not None:
        check_new(out, overwrite, "--out file")
    else:
        _writable_dir(out_dir, "--out-dir")
    if tp:
        from .tools.bench_tp import bench_tp, format_tp

        res = bench_tp(model_path, params=params, worlds=tp_worlds, device=tp_device)
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

        from .tools.bench_export import save_progress

        saved: list[str] = []  # the JSON is written after every phase (a run stopped keeps what it measured)
        res = bench_export(model_path, params=params, work_dir=out_dir, time_limit=time_limit or 200.0,
                           save=lambda r: saved.append(save_progress(r, out_dir, saved, out, overwrite)))
        print(format_export(res))
        print(f"saved {saved[-1]}")
        return 0
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

    if overwrite and not profile_dir:
        raise GGUFLabError("--overwrite is for the files of --profile DIR; without --profile, load writes nothing")
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


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail a second time."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on the command line: one line, as errors are (not Python's file:line form)."""
    print(f"gguf-gpu-lab: warning: {message}", file=sys.stderr if file is None else file)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, a job scheduler), raised as an interrupt: what an interrupted
    command cleans up (a partial export or model, a load's threads) is cleaned up the same way."""


def _terminate(signum, frame):
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    term = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        term = signal.signal(signal.SIGTERM, _terminate)  # (a handler someone else set is left alone)
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _main(argv: Sequence[str] | None) -> int:
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
                             args.overwrite, args.tp, args.tp_worlds, args.tp_device, args.first, args.remote,
                             args.connections, args.rate_gbps, args.time_limit)
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
    except KeyboardInterrupt as e:
        if isinstance(e, _Terminated):
            print("gguf-gpu-lab: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("gguf-gpu-lab: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
