"""The main job on a built-in default: write a synthetic model, inspect it, dequantize it on the
CPU against gguf-py, and load it onto the GPU (or the host backend without one)."""

from __future__ import annotations

import os
import time

from .. import quant
from ..model import _fmt_bytes, open_model
from ..outputs import claim_folder, record_folder
from .synth import synth
from .verify import mismatches, reference


def run_demo(out_dir: str = "gguf-lab-demo", params: str = "25M", mix: str = "Q4_K_M", progress=None,
             overwrite: bool = False) -> dict:
    """Synthesize a model into ``out_dir``, open and check it, dequantize every tensor on the CPU
    (all cores), verify each against gguf-py, and print a summary. Returns the figures.

    The files an earlier demo wrote in ``out_dir`` are replaced; a file of the same name that the
    toolkit did not write there is refused (``OutputExistsError``, before any work) unless
    ``overwrite``."""
    model = f"synthetic-{params}-{mix}.gguf"
    names = (model, "spans.csv", "timeline.png", "trace.json")
    path = claim_folder(out_dir, names, overwrite, "--overwrite (overwrite=True)")[model]
    record_folder(out_dir, [model])  # before synth writes it: a demo stopped half way may redo it
    r = synth(path, params, mix, seed=0, overwrite=True)
    print(f"1. wrote {path}: {r.n_tensors} tensors, {r.n_params / 1e6:.1f} M weights, "
          f"{_fmt_bytes(r.file_size)} in {r.seconds:.2f} s")
    out = {"model": path, "synth_s": r.seconds}
    with open_model(path) as m:
        s = m.summary()
        kinds = ", ".join(f"{t} x{int(row['count'])}" for t, row in s["by_type"].iterrows())
        print(f"2. opened: {s['architecture']}, GGUF v{s['version']}, {s['bits_per_weight']:.2f} bits/weight ({kinds})")
        problems = m.check()
        print(f"3. check: {'no NaN/Inf' if not problems else f'{len(problems)} problems'}")
        bar = progress("dequantize (CPU)", total=sum(t.n_bytes for t in m.tensors)) if progress else None
        t0 = time.perf_counter()
        n_weights, bad = 0, 0
        for t in m.tensors:
            x = m.dequantize(t.name)
            n_weights += x.size
            bad += mismatches(x, reference(m.raw(t.name), t.ggml_type)).size if quant.type_spec(t.ggml_type).kind != "int" else 0
            if bar is not None:
                bar.update(t.n_bytes)
        dt = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        print(f"4. dequantized {n_weights / 1e6:.1f} M weights on {quant.default_threads()} threads and compared "
              f"each tensor with gguf-py in {dt:.2f} s: {'bit-exact' if bad == 0 else f'{bad} values differ'}")
        out.update(n_weights=n_weights, mismatches=bad, dequant_and_verify_s=dt, problems=len(problems))

        from ..loader import load

        r = load(m, mode="gpu", dtype="float16", chunk_mb=1.0, progress=True if progress else None)  # small chunks: a pipeline to see
        wrong = sum(mismatches(r[t.name].numpy().reshape(-1), m.dequantize(t.name, "float16").reshape(-1)).size
                    for t in m.tensors)
        print(f"5. loaded all tensors ({r.backend} backend, gpu mode, float16): {r.file_bytes / 1e6:.1f} MB of file in "
              f"{r.wall_s:.3f} s, {r.gb_s:.2f} GB/s; {'equal to the CPU dequantization' if not wrong else f'{wrong} values differ'}")
        s = r.profile.summary()
        print(s["stages"].to_string(index=False))
        print(f"   overlap of stages {100 * s['overlap']:.0f}% of the wall time; bound by {s['bound_by']}")
        from ..plots import write_profile

        files = write_profile(r.profile, out_dir)
        record_folder(out_dir, names)
        out.update(load_gb_s=r.gb_s, load_backend=r.backend, load_mismatches=wrong, **files)
    print(f"files in {os.path.abspath(out_dir)}: {os.path.basename(path)}, spans.csv, timeline.png, trace.json "
          "(open it in https://ui.perfetto.dev)")
    return out
