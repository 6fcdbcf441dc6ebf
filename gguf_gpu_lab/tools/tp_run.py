"""One rank of a tensor-parallel load, run under torchrun: ``hf.from_gguf(path, tp_plan="auto")``,
then what this rank read against its shards (and the tensors it holds whole, replicated) and the
whole tensors, its times, the process group's backend (and NCCL's version on the GPUs), and a few
greedy tokens (the same on every rank). ``bench --tp`` runs it for worlds 1, 2 and 4.

    torchrun --nproc-per-node 2 -m gguf_gpu_lab.tools.tp_run model.gguf --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def run_rank(path: str, device: str, dtype: str, tokens: int, json_dir: str | None) -> dict:
    """Load ``path`` tensor-parallel on this rank; the rank's report (also written to
    ``json_dir/rank<N>.json`` when given)."""
    import torch
    import torch.distributed as dist

    from .. import hf

    t0 = time.perf_counter()
    model = hf.from_gguf(path, dtype=dtype, device=device, tp_plan="auto")
    ready_s = time.perf_counter() - t0
    r = model.gguf_load_result
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=dev)
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens) if tokens else ids
    rep = {"rank": rank, "world": world, "device": str(dev), "backend": dist.get_backend(),
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if dev.type == "cuda" else None,
           "read_bytes": r.file_bytes,
           "replicated_bytes": sum(dt.info.n_bytes for dt in r.values() if dt.shard is None),
           "wanted_bytes": r.wanted_bytes if r.wanted_bytes is not None else r.file_bytes,
           "whole_bytes": r.whole_bytes if r.whole_bytes is not None else r.file_bytes,
           "load_wall_s": r.wall_s, "from_gguf_s": ready_s, "steps_s": model.gguf_steps_s,
           "sharded_tensors": sum(dt.shard is not None for dt in r.values()), "tensors": len(r),
           "tokens": out[0, ids.shape[1]:].tolist()}
    if json_dir is not None:
        with open(os.path.join(json_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rep, f, indent=1)
    dist.barrier()
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gguf_gpu_lab.tools.tp_run",
                                description="one rank of a tensor-parallel GGUF load (run under torchrun)")
    p.add_argument("path", help="GGUF model file of a supported architecture")
    p.add_argument("--device", default="cuda", help="'cuda' (each rank its LOCAL_RANK GPU, NCCL) or 'cpu' (gloo)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens generated after the load (0 to 256)")
    p.add_argument("--json-dir", help="write each rank's report here as rank<N>.json (the folder must exist)")
    a = p.parse_args(argv)
    if not 0 <= a.tokens <= 256:
        p.error(f"--tokens must be from 0 to 256, got {a.tokens}")
    import torch.distributed as dist
    import transformers

    transformers.logging.set_verbosity_error()
    rep = run_rank(a.path, a.device, a.dtype, a.tokens, a.json_dir)
    print(f"rank {rep['rank']}/{rep['world']} on {rep['device']}: read {rep['read_bytes'] / 1e6:.2f} MB "
          f"(its shards {rep['wanted_bytes'] / 1e6:.2f} MB, whole tensors {rep['whole_bytes'] / 1e6:.2f} MB), "
          f"load {rep['load_wall_s']:.3f} s, from_gguf {rep['from_gguf_s']:.2f} s; tokens {rep['tokens']}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
