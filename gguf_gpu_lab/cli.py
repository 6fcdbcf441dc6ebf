"""Command line: argument parsing only; the work is done by the library's functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import GGUFLabError


def _progress_bar(desc: str, total: int | None = None, unit: str = "B"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, leave=False,
                disable=not sys.stderr.isatty() and os.environ.get("GGUF_LAB_PROGRESS") != "1")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    return str(o)


def cmd_inspect(path: str, as_json: bool, tensors: bool) -> int:
    from .model import _fmt_bytes, open_model

    with open_model(path) as m:
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
            print(f"  {k} = {v}")
        print("\nby type:")
        print(s["by_type"].to_string())
        if tensors:
            import pandas as pd

            with pd.option_context("display.max_rows", None, "display.width", 200):
                print("\ntensors:")
                print(m.tensors_df().drop(columns=["np_shape"]).to_string(index=False))
    return 0


def cmd_synth(out: str, params: str, mix: str, seed: int, vocab: int | None = None, arch: str = "llama",
              heads: int | None = None, kv_heads: int | None = None, weights: str = "random") -> int:
    from .synth import synth

    bar = _progress_bar(f"synth {arch} {params} {mix}")
    last = [0]

    def progress(done, total, name):
        bar.total = total
        bar.update(done - last[0])
        last[0] = done

    try:
        r = synth(out, params, mix, seed, vocab=vocab, progress=progress, arch=arch, heads=heads, kv_heads=kv_heads,
                  weights=weights)
    finally:
        bar.close()
    print(f"wrote {r.path}: {r.n_tensors} tensors, {r.n_params / 1e6:.1f} M weights, "
          f"{r.file_size / 1e6:.1f} MB in {r.seconds:.2f} s ({r.mb_per_s:.0f} MB/s)")
    return 0


def cmd_dequant(path: str, name: str, out: str | None, dtype: str, verify: bool) -> int:
    import numpy as np

    from .model import open_model

    with open_model(path) as m:
        t = m.info(name)
        x = m.dequantize(name, dtype)
        print(f"{name}: {t.type_name} {t.np_shape} -> {x.dtype} "
              f"min {float(x.min()):.6g} max {float(x.max()):.6g} mean {float(x.astype(np.float32).mean()):.6g}")
        if verify:
            from .verify import verify_tensor

            ok, msg = verify_tensor(m, name)
            print(msg)
            if not ok:
                return 1
        if out:
            np.save(out, x)
            print(f"saved {out}")
    return 0


def cmd_check(path: str, max_problems: int) -> int:
    from .model import open_model

    with open_model(path) as m:
        problems = m.check(max_problems=max_problems)
    for p in problems:
        print(p)
    if problems:
        print(f"{path}: {len(problems)} problem(s) found")
        return 1
    print(f"{path}: ok, no NaN or Inf in float tensors or block scales")
    return 0


def cmd_bench(cpu: bool, dequant: bool, out_dir: str, size_mb: int, types: list[str] | None,
              model_path: str | None = None, params: str = "8B", hf: bool = False) -> int:
    from . import bench

    if cpu + dequant + hf > 1:
        raise GGUFLabError("choose one benchmark: --cpu, --dequant, --hf, or none (the loader)")
    if hf:
        from .bench_hf import bench_hf, format_hf

        res = bench_hf(model_path, params=params)
        print(format_hf(res))
    elif not cpu and not dequant:
        from .bench_load import bench_load, format_load

        res = bench_load(model_path, params=params)
        print(format_load(res))
    elif cpu:
        res = bench.bench_cpu(types=types, weights=size_mb * (1 << 20) // 4)
        print(bench.format_cpu(res))
    else:
        from .bench_gpu import bench_gpu_dequant, format_gpu_dequant

        res = bench_gpu_dequant(types=types, n_elements=size_mb * (1 << 20) // 2)
        print(format_gpu_dequant(res))
    path = bench.save_result(res, out_dir, res["benchmark"])
    print(f"saved {path}")
    return 0


def cmd_load(path: str, mode: str, dtype: str, streams: int, chunk_mb: float, readers: int, order: str,
             backend: str, profile_dir: str | None, repeat: int = 1) -> int:
    from .loader import load
    from .model import open_model
    from .plots import write_profile

    if repeat < 1:
        raise GGUFLabError(f"--repeat must be at least 1, got {repeat}")
    show = sys.stderr.isatty() or os.environ.get("GGUF_LAB_PROGRESS") == "1"
    with open_model(path) as m:
        for i in range(repeat):
            # the first load in a process also pins the staging ring and grows the device pool;
            # later ones reuse both, as a process that loads often would
            r = load(m, mode=mode, dtype=dtype, streams=streams, chunk_mb=chunk_mb, readers=readers, order=order,
                     backend=backend, progress=True if show else None)
            which = f"load {i + 1} of {repeat}: " if repeat > 1 else ""
            print(f"{which}loaded {len(r)} tensors ({r.file_bytes / 1e9:.3f} GB of file, {r.out_bytes / 1e9:.3f} GB on "
                  f"the device) in {r.wall_s:.3f} s: {r.gb_s:.2f} GB/s, mode {mode}, backend {r.backend}")
            if i < repeat - 1:
                del r
        if r.profile is not None:
            print(r.profile.stage_summary().to_string(index=False))
            if profile_dir:
                for what, p in write_profile(r.profile, profile_dir).items():
                    print(f"{what}: {p}")
    return 0


def cmd_fuzz(cases: int, seed: int, out: str | None) -> int:
    import json

    from . import fuzz
    from .bench import machine_info

    bar = _progress_bar("fuzz", total=cases, unit="case")
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
        with open(out, "w") as fh:
            json.dump(doc, fh, indent=2)
        print(f"saved {out}")
    return 0 if rep.ok() else 1


def cmd_demo(out_dir: str, params: str, mix: str) -> int:
    from .demo import run_demo

    run_demo(out_dir, params=params, mix=mix, progress=_progress_bar)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gguf-gpu-lab", description="Load GGUF models onto a GPU fast, and see how.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="show a model's metadata and tensor table")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--tensors", action="store_true", help="list every tensor")

    s = sub.add_parser("synth", help="write a synthetic model (llama-shaped, or --arch)")
    s.add_argument("out", help="output .gguf path")
    s.add_argument("--params", default="25M", help="size: 25M, 1B, 7B, ... (default 25M)")
    s.add_argument("--mix", default="Q4_K_M", help="Q4_0, Q8_0, Q4_K_M, Q6_K, F16 or all-types (default Q4_K_M)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size: token list, scores and types, embedding rows (default: the size's own)")
    s.add_argument("--arch", default="llama",
                   help="architecture: llama, mistral, qwen2, qwen3, gemma2, gemma3 or phi3 (default llama)")
    s.add_argument("--heads", type=int, default=None, help="attention heads (default: the size's own)")
    s.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: as many as --heads)")
    s.add_argument("--weights", default="random", choices=["random", "small"],
                   help="small: weights the size a trained model's are (finite float16 forward passes)")

    s = sub.add_parser("dequant", help="dequantize one tensor on the CPU")
    s.add_argument("path")
    s.add_argument("name")
    s.add_argument("--out", help="save as .npy")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--verify", action="store_true", help="compare with gguf-py's dequantize")

    s = sub.add_parser("load", help="load a model onto the GPU (or the host backend) and report")
    s.add_argument("path")
    s.add_argument("--mode", default="gpu", choices=["gpu", "raw", "cpu", "sequential"])
    s.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    s.add_argument("--streams", type=int, default=4)
    s.add_argument("--chunk-mb", type=float, default=16.0)
    s.add_argument("--readers", type=int, default=None, help="reader threads (default: two fewer than the cores, 2 to 14)")
    s.add_argument("--order", default="file", choices=["file", "largest", "layer"])
    s.add_argument("--backend", default="auto", choices=["auto", "cupy", "host"])
    s.add_argument("--profile", metavar="DIR", help="write the spans (CSV), the timeline (PNG) and a Chrome trace (JSON) here")
    s.add_argument("--repeat", type=int, default=1,
                   help="load N times, each reported (the first also pins the staging ring and grows the device "
                        "pool); the profile is the last load's")

    s = sub.add_parser("check", help="scan for NaN/Inf in float tensors and block scales (exit 1 if found)")
    s.add_argument("path")
    s.add_argument("--max-problems", type=int, default=100)

    s = sub.add_parser("bench", help="run a benchmark (default: the loader on the GPU) and save its JSON result")
    s.add_argument("--cpu", action="store_true", help="CPU dequantization throughput")
    s.add_argument("--dequant", action="store_true", help="GPU dequantization throughput against a device copy")
    s.add_argument("--hf", action="store_true",
                   help="hf.from_gguf against transformers' from_pretrained(gguf_file=...) and load() (needs the hf extra)")
    s.add_argument("--model", help="loader and --hf benchmarks: this model (default: a synthetic one of --params)")
    s.add_argument("--params", default="8B", help="loader and --hf benchmarks: synthetic model size (default 8B, ~4.6 GiB Q4_K_M)")
    s.add_argument("--out-dir", default="benchmarks/results")
    s.add_argument("--size-mb", type=int, default=256,
                   help="output size per type: float32 MB for --cpu, float16 MiB for --dequant (default 256)")
    s.add_argument("--types", nargs="*", help="GGML types (default: Q4_0 Q8_0 Q4_K Q6_K for --cpu, every type for --dequant)")

    s = sub.add_parser("fuzz", help="fuzz the parser and CPU load path with mutated GGUF files (exit 1 on a failure)")
    s.add_argument("--cases", type=int, default=10000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="save the counts as JSON")

    s = sub.add_parser("demo", help="the main job on a built-in synthetic model")
    s.add_argument("--out-dir", default="gguf-lab-demo")
    s.add_argument("--params", default="25M")
    s.add_argument("--mix", default="Q4_K_M")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return cmd_inspect(args.path, args.json, args.tensors)
        if args.command == "synth":
            return cmd_synth(args.out, args.params, args.mix, args.seed, args.vocab, args.arch, args.heads,
                             args.kv_heads, args.weights)
        if args.command == "dequant":
            return cmd_dequant(args.path, args.name, args.out, args.dtype, args.verify)
        if args.command == "load":
            return cmd_load(args.path, args.mode, args.dtype, args.streams, args.chunk_mb, args.readers, args.order,
                            args.backend, args.profile, args.repeat)
        if args.command == "check":
            return cmd_check(args.path, args.max_problems)
        if args.command == "bench":
            return cmd_bench(args.cpu, args.dequant, args.out_dir, args.size_mb, args.types, args.model, args.params,
                             args.hf)
        if args.command == "fuzz":
            return cmd_fuzz(args.cases, args.seed, args.out)
        if args.command == "demo":
            return cmd_demo(args.out_dir, args.params, args.mix)
    except (GGUFLabError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gguf-gpu-lab: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gguf-gpu-lab: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gguf-gpu-lab: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
