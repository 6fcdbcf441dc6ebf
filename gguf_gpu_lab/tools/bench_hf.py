"""``hf.from_gguf`` end to end against transformers' ``from_pretrained(dir, gguf_file=...)`` and
against a plain ``load()`` of the same file, in the same run, in one process.

Targets: from_gguf at least 100x faster than transformers, and within 1.5x of ``load()``.
``first`` is the process's first call (transformers' model modules imported, kernels compiled on
a fresh machine); ``steady`` the median of the calls after it. Every figure ends with the device
synchronized.
"""

from __future__ import annotations

import gc
import os
import statistics
import time

from .bench import bench_model, machine_info, package_version, save_result


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_device_pools(device) -> None:
    """Give the memory of models deleted since back to the device, so the next load starts alike."""
    gc.collect()
    if device.type == "cuda":
        import cupy
        import torch

        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()


def _time_load(path: str, dtype: str, backend: str, index: int, device) -> float:
    from ..loader import load

    t0 = time.perf_counter()
    r = load(path, dtype=dtype, backend=backend, device=index)
    _sync(device)
    dt = time.perf_counter() - t0
    del r
    return dt


def _time_from_gguf(path: str, dtype: str, device):
    from .. import hf

    t0 = time.perf_counter()
    model = hf.from_gguf(path, dtype=dtype, device=device)
    _sync(device)
    return time.perf_counter() - t0, model


def _same_weights(a, b) -> dict:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    equal = sum(1 for k in sb if k in sa and sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
                and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)))
    return {"tensors": len(sb), "bit_identical": equal, "same_names": sa.keys() == sb.keys()}


def bench_hf(model_path: str | None = None, params: str = "8B", mix: str = "Q4_K_M", dtype: str = "float16",
             device: str = "cuda", repeat: int = 3, transformers: bool = True) -> dict:
    """from_gguf, load() and transformers' from_pretrained on the same file (a synthetic llama of
    ``params`` and ``mix`` unless ``model_path`` is given), page cache warm.

    Example:
        >>> res = bench_hf(params="8B")          # doctest: +SKIP
        >>> print(format_hf(res))                # doctest: +SKIP
    """
    import torch

    from .. import hf_convert

    dev, backend, index = hf_convert._device(device)
    with bench_model(model_path, params, mix, arch="llama", weights="small") as (model_path, synth_info):
        info = {"device": str(dev)}
        if dev.type == "cuda":
            from .bench_gpu import device_info

            info = device_info()
        res = {"benchmark": "hf", "machine": machine_info(), "device": info, "torch": torch.__version__,
               "transformers": package_version("transformers"), "dtype": dtype, "repeat": repeat,
               "model": {"path": os.path.basename(model_path), "file_bytes": os.path.getsize(model_path),
                         "synth": synth_info},
               "targets": {"vs_transformers_at_least": 100.0, "vs_load_at_most": 1.5}}
        res["load_first_s"] = _time_load(model_path, dtype, backend, index, dev)
        first, model = _time_from_gguf(model_path, dtype, dev)
        res["from_gguf_first_s"], res["from_gguf_first_steps_s"] = first, model.gguf_steps_s
        del model
        loads, runs, steps = [], [], []
        for i in range(repeat):
            _free_device_pools(dev)
            loads.append(_time_load(model_path, dtype, backend, index, dev))
            _free_device_pools(dev)
            t, model = _time_from_gguf(model_path, dtype, dev)
            runs.append(t)
            steps.append(model.gguf_steps_s)
            if i < repeat - 1:
                del model
        res["load_s"], res["load_all_s"] = statistics.median(loads), loads
        res["from_gguf_s"], res["from_gguf_all_s"] = statistics.median(runs), runs
        res["from_gguf_steps_s"] = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        res["from_gguf_over_load"] = res["from_gguf_s"] / res["load_s"]
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        res["parameter_bytes"] = params_bytes
        if dev.type == "cuda":  # the weights live in the loader's CuPy arrays, torch holds no copy
            import cupy

            res["cupy_pool_used_bytes"] = cupy.get_default_memory_pool().used_bytes()
            res["torch_allocated_bytes"] = torch.cuda.memory_allocated(dev)
        if transformers:
            from transformers import AutoModelForCausalLM

            t0 = time.perf_counter()
            ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(model_path)),
                                                       gguf_file=os.path.basename(model_path),
                                                       dtype=getattr(torch, dtype), device_map=str(dev),
                                                       use_kernels=False)
            _sync(dev)
            res["transformers_s"] = time.perf_counter() - t0
            res["speedup_vs_transformers"] = res["transformers_s"] / res["from_gguf_s"]
            res["same_weights"] = _same_weights(model, ref)
            del ref
        res["meets_targets"] = {
            "vs_load": res["from_gguf_over_load"] <= res["targets"]["vs_load_at_most"],
            "vs_transformers": (res["speedup_vs_transformers"] >= res["targets"]["vs_transformers_at_least"]
                                if "speedup_vs_transformers" in res else None)}
        del model
        _free_device_pools(dev)
        return res


def format_hf(res: dict) -> str:
    d = res["device"]
    st = res["from_gguf_steps_s"]
    lines = [f"from_gguf on {d.get('name', d.get('device'))} ({res['machine']['date']}): {res['model']['path']}, "
             f"{res['model']['file_bytes'] / 1e9:.2f} GB, {res['dtype']}, page cache warm; torch {res['torch']}, "
             f"transformers {res['transformers']}",
             f"load()            steady {res['load_s']:.3f} s   first {res['load_first_s']:.3f} s",
             f"from_gguf         steady {res['from_gguf_s']:.3f} s   first {res['from_gguf_first_s']:.3f} s   "
             f"= {res['from_gguf_over_load']:.2f}x load() (target <= {res['targets']['vs_load_at_most']}x)",
             "  steps (steady): " + ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in st.items() if k != "total_s")]
    if "transformers_s" in res:
        sw = res["same_weights"]
        lines.append(f"transformers      {res['transformers_s']:.1f} s: from_gguf is {res['speedup_vs_transformers']:.0f}x "
                     f"faster (target >= {res['targets']['vs_transformers_at_least']:.0f}x); "
                     f"{sw['bit_identical']} of {sw['tensors']} tensors bit-identical")
    if "cupy_pool_used_bytes" in res:
        lines.append(f"device memory: parameters {res['parameter_bytes'] / 1e9:.2f} GB, CuPy pool in use "
                     f"{res['cupy_pool_used_bytes'] / 1e9:.2f} GB, torch allocated {res['torch_allocated_bytes'] / 1e9:.3f} GB")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m gguf_gpu_lab.tools.bench_hf [--model PATH] [--params 8B] [--device cuda]
    import argparse

    p = argparse.ArgumentParser(prog="python -m gguf_gpu_lab.tools.bench_hf")
    p.add_argument("--model")
    p.add_argument("--params", default="8B")
    p.add_argument("--mix", default="Q4_K_M")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    a = p.parse_args()
    r = bench_hf(a.model, a.params, a.mix, a.dtype, a.device, a.repeat, not a.no_transformers)
    print(format_hf(r))
    print(f"saved {save_result(r, a.out_dir, r['benchmark'])}")
