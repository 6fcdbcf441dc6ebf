"""The command line's arguments: the parser of every command, the argparse types that give each
number its range (one line naming the flag when a value is outside), and the defaults the
commands share. ``cli.py`` runs the commands."""

from __future__ import annotations

import argparse

BENCH_DIR = "gguf-lab-bench"  # under the working directory; the committed results are benchmarks/results
CHUNK_MB = (1 / 64, 1024.0)  # the range of --chunk-mb (loader.plan.LoadOptions checks the same for the API)
MAX_DEVICE = 1023  # the largest device index --device takes (a backend checks against its own devices)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the flag and the value, where to find the options)
    instead of the whole usage; the sub-commands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's, with arguments no parser took named with the command's own help."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = f"{self.prog} {ns.command}" if getattr(ns, "command", None) else self.prog
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        return ns


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


def _size(text: str) -> int:
    """A size such as 5GB (``export_layout.size_bytes``: KB, MB, GB, TB; 1KB to 10TB)."""
    from .export_layout import size_bytes

    try:
        return size_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gguf-gpu-lab", description="Load GGUF models onto a GPU fast, and see how.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="show a model's metadata and bytes by tensor type (--tensors: every tensor)")
    s.add_argument("path", help="GGUF model file")
    s.add_argument("--json", action="store_true",
                   help="machine-readable output (strings whole; arrays as their type, length and first items)")
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
    s.add_argument("--tp-worlds", type=_whole(1, 64), nargs="+", default=None,
                   help="--tp: the world sizes (default 1 2 4)")
    s.add_argument("--tp-device", choices=["auto", "cuda", "cpu"], default=None,
                   help="--tp: 'cuda' (NCCL), 'cpu' (gloo) or 'auto' (the GPUs where there are two or more)")
    s.add_argument("--first", action="store_true",
                   help="the first minute in Jupyter kernels (nbclient): a bar's cost on the big and a ~20 MB file, the "
                        "first load 1 s after open and with no pause, the kernel's first bar, a warm load's first copy; "
                        "from_gguf's first call and transformers' import apart (fresh processes)")
    s.add_argument("--remote", action="store_true",
                   help="load over HTTP from a local server against its raw ranged transfer of the same bytes with "
                        "the same connections, unthrottled and at --rate-gbps, and against the local load")
    s.add_argument("--connections", type=_whole(1, 256), default=None,
                   help="--remote: connections (reader threads), 1-256 (default 16)")
    s.add_argument("--rate-gbps", type=_between(0.001, 1000), default=None,
                   help="--remote: the throttled server's GB/s, 0.001-1000 (default 1)")
    s.add_argument("--time-limit", type=_between(1, 86400), default=None,
                   help="--export: seconds for the whole run, 1-86400 (default 200); each phase runs in a child "
                        "process with what is left, the JSON is written after every phase")
    s.add_argument("--big-params", default="70B",
                   help="--multi-gpu: the large model loaded over all GPUs (default 70B; 'none' skips it)")
    s.add_argument("--out", help="write the JSON result to this file (default: a file named by date and time in "
                                 "--out-dir)")
    s.add_argument("--overwrite", action="store_true", help="replace a file at --out (refused by default)")
    s.add_argument("--model", help="loader, --e2e, --hf, --export, --first and --tp benchmarks: this model (default: a synthetic "
                                  "one of --params)")
    s.add_argument("--params", default=None, help="loader, --e2e, --hf, --export, --first and --tp benchmarks: synthetic model "
                                                "size (default 8B, ~4.6 GiB Q4_K_M; 25M for --tp)")
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
    s.add_argument("--max-shard-size", default="5GB", type=_size,
                   help="largest safetensors file: KB, MB, GB or TB (10^9 bytes a GB), 1KB to 10TB (default 5GB)")
    s.add_argument("--budget", default="2GB", type=_size,
                   help="memory the weights may take at once, 1KB to 10TB (default 2GB): host memory on the host "
                        "backend; on a GPU, device memory (the host holds a 256 MiB ring of pinned buffers)")
    s.add_argument("--device", default="auto",
                   help="auto (the GPU where there is one, else the host backend), cuda, cuda:N or cpu (default auto)")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder, replacing the model files there (an earlier export's "
                        "shards, config, tokenizer and chat template); others stay")

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
