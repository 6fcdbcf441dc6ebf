"""How the CPU dequantizer's task size (weights per thread-pool task) moves throughput.

    python benchmarks/cpu_task_sweep.py OUT.json
"""

import json
import sys
import time

import numpy as np

from gguf_gpu_lab import quant
from gguf_gpu_lab.tools.bench import machine_info
from gguf_gpu_lab.quant import _cpu
from gguf_gpu_lab.tools.synth import random_blocks


def main(path: str) -> None:
    rows = []
    threads = quant.default_threads()
    for name in ("Q4_0", "Q8_0", "Q4_K", "Q6_K"):
        spec = quant.type_spec(name)
        n_blocks = (64 << 20) // spec.block_size
        blocks = random_blocks(spec.ggml_type, n_blocks, np.random.Generator(np.random.SFC64(0)))
        out = np.empty((n_blocks, spec.block_size), np.float32)
        for task in (1 << 16, 1 << 18, 1 << 20, 1 << 22, None):
            for t in (1, threads):
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    _cpu.dequantize_blocks(spec, blocks, out, t, task)
                    best = min(best, time.perf_counter() - t0)
                rows.append({"type": name, "task_elements": task or "auto", "threads": t, "mw_s": out.size / best / 1e6})
                print(rows[-1], flush=True)
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
