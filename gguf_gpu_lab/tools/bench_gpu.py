"""GPU benchmarks: dequantization throughput against a device-to-device copy measured in the
same run."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from .. import quant
from .bench import machine_info
from ..quant.gpu import GPU_KERNELS, dequantize_gpu, gpu_dtype
from .verify import mismatches, reference, round_reference

# Targets, as fractions of the copy's bandwidth: every type and dtype at 0.70 or more, and the
# main types at 0.80 or more to the 16-bit dtypes models are served in (issue 12).
TARGET_ALL = 0.70
TARGET_MAIN = 0.80
MAIN_TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
MAIN_DTYPES = ("float16", "bfloat16")


def device_info() -> dict:
    from ..device import get_backend

    return get_backend("cupy").info()


def _time_ms(cp, fn, repeat: int) -> float:
    """Mean milliseconds of ``fn`` over ``repeat`` runs, timed with events on the current stream."""
    fn()  # warm-up (and first-use compile)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / repeat


def copy_peak(cp, nbytes: int = 1 << 30, repeat: int = 20) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    a = cp.empty(nbytes, cp.uint8)
    b = cp.empty_like(a)
    a.fill(1)
    ms = _time_ms(cp, lambda: b.__setitem__(Ellipsis, a), repeat)
    return {"bytes": nbytes, "ms": ms, "gb_s": 2 * nbytes / ms / 1e6}


def bench_gpu_dequant(types: Sequence[str] | None = None, dtypes: Sequence[str] = ("float16", "float32", "bfloat16"),
                      n_elements: int = 128 << 20, repeat: int = 20) -> dict:
    """For each type and output dtype: achieved GB/s (quantized bytes read + output bytes written)
    of dequantizing an ``n_elements`` tensor (default 128 Mi weights: 256 MiB of float16), against
    a device-to-device copy measured in the same run. Each result is checked against gguf-py on
    its first and last blocks before it is timed."""
    import cupy as cp

    from .synth import random_blocks

    peak = copy_peak(cp)
    rows = []
    names = list(types) if types else [t.name for t in GPU_KERNELS]
    for name in names:
        spec = quant.type_spec(name)
        n_blocks = n_elements // spec.block_size
        rng = np.random.Generator(np.random.SFC64(0))
        host = random_blocks(spec.ggml_type, n_blocks, rng)
        raw = cp.asarray(host.reshape(-1))
        for dtype in dtypes:
            store = gpu_dtype(dtype)[1]
            out = cp.empty(n_blocks * spec.block_size, store)
            dequantize_gpu(raw, spec.ggml_type, dtype=dtype, out=out)
            k = min(n_blocks, 512)  # correctness on the first and last blocks before timing
            head = out[:k * spec.block_size].get()
            tail = out[-k * spec.block_size:].get()
            bad = 0
            for got, blk in ((head, host[:k]), (tail, host[-k:])):
                ref = reference(blk, spec.ggml_type)
                ref = ref if dtype == "float32" else round_reference(ref, dtype).view(np.uint16)
                bad += mismatches(got, ref).size
            ms = _time_ms(cp, functools.partial(dequantize_gpu, raw, spec.ggml_type, dtype=dtype, out=out), repeat)
            moved = raw.nbytes + out.nbytes
            gbs = moved / ms / 1e6
            target = TARGET_MAIN if (spec.name in MAIN_TYPES and dtype in MAIN_DTYPES) else TARGET_ALL
            rows.append({"type": spec.name, "dtype": dtype, "elements": int(out.size), "in_bytes": int(raw.nbytes),
                         "out_bytes": int(out.nbytes), "ms": ms, "gb_s": gbs, "ratio_to_copy": gbs / peak["gb_s"],
                         "target": target, "meets_target": gbs / peak["gb_s"] >= target, "mismatches": int(bad)})
            del out
        del raw
        cp.get_default_memory_pool().free_all_blocks()
    return {"benchmark": "gpu-dequant", "machine": machine_info(), "device": device_info(),
            "copy_peak": peak, "repeat": repeat, "results": rows}


def format_gpu_dequant(res: dict) -> str:
    d, p = res["device"], res["copy_peak"]
    lines = [f"GPU dequantization on {d['name']} (CuPy {d['cupy']}), {res['machine']['date']}",
             f"device-to-device copy: {p['gb_s']:.0f} GB/s (read + write)",
             f"{'type':8} {'dtype':9} {'GB/s':>7} {'x copy':>7} {'target':>7}  exact"]
    for r in res["results"]:
        lines.append(f"{r['type']:8} {r['dtype']:9} {r['gb_s']:7.0f} {r['ratio_to_copy']:7.2f} "
                     f"{r['target']:7.2f}{'' if r['meets_target'] else ' MISS'}  {'yes' if r['mismatches'] == 0 else 'NO'}")
    return "\n".join(lines)
