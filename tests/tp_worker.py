"""One rank of tests/test_hf_tp.py, run under torchrun (gloo on the CPU, or with
GGUF_LAB_TP_DEVICE=cuda NCCL, a GPU a rank): every case of the file list the test wrote, then the
failure cases and device_mesh=; each rank writes what it saw to ``rank<N>.json`` for the test to
check. Not collected by pytest (its name does not start with test_)."""

import json
import os
import sys
import threading
import time

DEVICE = os.environ.get("GGUF_LAB_TP_DEVICE", "cpu")  # "cuda": each rank on cuda:LOCAL_RANK, NCCL


def _bits_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def _expected_bytes(conv_names, model, shards, world) -> int:
    """The rank's shards (1/world of each sharded tensor) and the whole replicated tensors."""
    return sum(t.n_bytes // world if t.name in shards else t.n_bytes for t in model.tensors if t.name in conv_names)


def check_case(case: dict, world: int) -> dict:
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from gguf_gpu_lab import hf

    t0 = time.perf_counter()
    tp = hf.from_gguf(case["gguf"], dtype="float32", device=DEVICE, tp_plan="auto")
    load_s = time.perf_counter() - t0
    one = hf.from_gguf(case["gguf"], dtype="float32", device=DEVICE)
    ref = AutoModelForCausalLM.from_pretrained(case["saved"], tp_plan="auto", dtype=torch.float32,
                                               use_kernels=False)  # no Hub kernels: no network in tests
    a, b, c = (dict(m.named_parameters(remove_duplicate=False)) for m in (tp, ref, one))
    out = {"case": case["name"], "load_s": load_s, "problems": []}
    bad = out["problems"]
    if a.keys() != b.keys():
        bad.append(f"parameter names differ from transformers' tp model: {sorted(a.keys() ^ b.keys())[:4]}")
    sharded = 0
    for k in sorted(a.keys() & b.keys()):  # one order on every rank: full_tensor() is a collective
        pa, pb = a[k], b[k]
        if isinstance(pa, DTensor) != isinstance(pb, DTensor):
            bad.append(f"{k}: DTensor {isinstance(pa, DTensor)}, transformers' {isinstance(pb, DTensor)}")
            continue
        if isinstance(pa, DTensor):
            sharded += any(not p.is_replicate() for p in pa.placements)
            if pa.placements != pb.placements or pa.device_mesh.shape != pb.device_mesh.shape:
                bad.append(f"{k}: placements {pa.placements} on {pa.device_mesh.shape}, transformers' "
                           f"{pb.placements} on {pb.device_mesh.shape}")
            if tuple(pa.to_local().shape) != tuple(pb.to_local().shape) or pa.stride() != pb.stride():
                bad.append(f"{k}: local shape {tuple(pa.to_local().shape)}, transformers' {tuple(pb.to_local().shape)}")
            full = pa.full_tensor()
        else:
            full = pa
        if not _bits_equal(full, c[k]):
            bad.append(f"{k}: full_tensor() differs from the one-process from_gguf")
        if pa.requires_grad != pb.requires_grad:
            bad.append(f"{k}: requires_grad {pa.requires_grad}, transformers' {pb.requires_grad}")
    if (tp.lm_head.weight is tp.get_input_embeddings().weight) != (ref.lm_head.weight is ref.get_input_embeddings().weight):
        bad.append("the output layer's tie to the embedding differs from transformers'")
    ids = torch.tensor([case["input"]], device=next(one.parameters()).device)
    with torch.no_grad():
        la, lc, lr = tp(ids).logits.float(), one(ids).logits.float(), ref(ids).logits.float()
    la, lc, lr = la.cpu(), lc.cpu(), lr.cpu()
    out["max_logit_diff"] = float((la - lc).abs().max())
    out["max_logit_diff_vs_transformers_tp"] = float((la - lr).abs().max())
    out["max_abs_logit"] = float(lc.abs().max())
    ga = tp.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    gc = one.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    out["greedy_same"] = bool(torch.equal(ga, gc)) and ga.shape[1] == ids.shape[1] + 20
    r = tp.gguf_load_result
    model = hf.shared_model(case["gguf"])
    conv_names = set(r.tensors)
    shards = {n for n, dt in r.tensors.items() if dt.shard is not None}
    out.update(read_bytes=r.file_bytes, wanted_bytes=r.wanted_bytes, whole_bytes=r.whole_bytes, sharded=sharded,
               shards=len(shards), expected_bytes=_expected_bytes(conv_names, model, shards, world),
               aligned=all(dt.cut is None or dt.cut.aligned for dt in r.tensors.values()))
    return out


def _leftover_threads() -> list[str]:
    from gguf_gpu_lab.loader import lanes

    kept = lanes.kept_threads()  # the lanes kept for the next load are not left over
    return [t.name for t in threading.enumerate() if t.name.startswith("gguf-lab-") and t not in kept]


def check_failures(files: dict, rank: int, world: int) -> dict:
    """A rank that fails mid-load, a world that does not divide the heads, ranks on different files."""
    from gguf_gpu_lab import ShardError, hf
    from gguf_gpu_lab.hf_tp import TensorParallelError
    from gguf_gpu_lab.loader import pipeline

    out: dict = {}
    real = pipeline.read_chunk
    calls = []

    def broken(source, pieces, slot, mapped):
        calls.append(pieces[0].file_offset)
        if len(calls) == 3:
            raise OSError("disk on fire")
        return real(source, pieces, slot, mapped)

    if rank == world - 1:
        pipeline.read_chunk = broken
    try:
        hf.from_gguf(files["good"], dtype="float32", device=DEVICE, tp_plan="auto", chunk_mb=0.02)
        out["failing_rank"] = "no error"
    except TensorParallelError as e:
        out["failing_rank"] = str(e)
    finally:
        pipeline.read_chunk = real
    out["threads_after_failure"] = _leftover_threads()
    try:
        hf.from_gguf(files["bad_heads"], dtype="float32", device=DEVICE, tp_plan="auto")
        out["bad_heads"] = "no error"
    except ShardError as e:
        out["bad_heads"] = str(e)
    try:
        hf.from_gguf(files["good" if rank == 0 else "other"], dtype="float32", device=DEVICE, tp_plan="auto")
        out["other_file"] = "no error"
    except TensorParallelError as e:
        out["other_file"] = str(e)
    try:
        hf.from_gguf(files["good"] if rank == 0 else files["good"] + ".missing", dtype="float32", device=DEVICE,
                     tp_plan="auto")
        out["missing_file"] = "no error"
    except TensorParallelError as e:
        out["missing_file"] = str(e)
    return out


def check_device_mesh(files: dict, world: int) -> list[str]:
    """device_mesh=: a 1-D mesh of the whole world gives the same parameters as transformers' own."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from gguf_gpu_lab import hf

    mesh = init_device_mesh(DEVICE, (world,), mesh_dim_names=("tp",))
    a = dict(hf.from_gguf(files["good"], dtype="float32", device=DEVICE, tp_plan="auto",
                          device_mesh=mesh).named_parameters())
    b = dict(hf.from_gguf(files["good"], dtype="float32", device=DEVICE, tp_plan="auto").named_parameters())
    bad = []
    for k in sorted(b):
        pa, pb = a[k], b[k]
        if getattr(pa, "placements", None) != getattr(pb, "placements", None):
            bad.append(f"{k}: placements {getattr(pa, 'placements', None)} against {getattr(pb, 'placements', None)}")
        elif hasattr(pa, "to_local") and not torch.equal(pa.to_local(), pb.to_local()):
            bad.append(f"{k}: local shard differs")
    return bad


def main(spec_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    import transformers

    transformers.logging.set_verbosity_error()
    from gguf_gpu_lab.hf_tp import init_distributed

    spec = json.load(open(spec_path))
    init_distributed(DEVICE, 120)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"rank": rank, "world": world, "cases": [], "errors": []}
    for case in spec["cases"]:
        try:
            results["cases"].append(check_case(case, world))
        except Exception as e:  # reported by the test, with the case named
            results["errors"].append(f"{case['name']}: {type(e).__name__}: {e}")
            raise
    results["failures"] = check_failures(spec["failure_files"], rank, world)
    results["device_mesh_problems"] = check_device_mesh(spec["failure_files"], world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
