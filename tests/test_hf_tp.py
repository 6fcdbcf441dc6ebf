"""hf.from_gguf(tp_plan="auto") under torchrun on the CPU (gloo): one launch of 2 ranks, one of 4, and
one world of 2 made by two launchers (two "nodes" on 127.0.0.1, one rendezvous). Each launch covers
every supported architecture (tests/tp_worker.py does the work on each rank):

- every parameter's full_tensor() bit-identical to the one-process from_gguf;
- the same parameter names, DTensor placements, local shapes and ties as transformers' own
  from_pretrained(tp_plan="auto") of the same weights (saved with save_pretrained);
- logits within 1e-5 relative to the largest logit of the one-process model (float32; the sums of
  a row split run in another order: about 1e-7 seen), 20 greedy tokens identical;
- each rank's bytes read no more than its shards + the replicated tensors + 1 %;
- a rank failing mid-load makes every rank raise, with no reader thread left; a world that does not
  divide the key/value heads is one error naming the tensor; ranks on different files, or that
  cannot open it, are named;
- device_mesh= (a 1-D mesh of the world) gives the same shards as transformers' own mesh.

Needs the hf extra; skipped without it, except where CI=true.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from .needs import require


require("torch", "transformers", "accelerate")

from gguf_gpu_lab import hf  # noqa: E402
from gguf_gpu_lab.tools.synth import synth  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = [1, 5, 9, 30, 200, 7, 511]
# grouped-query attention where the width allows it; qwen3's heads are 128 wide (transformers reads
# no head size from a qwen3 file), so it takes the 512-wide configuration with 4 key/value heads
SHAPES = {"qwen3": ("10M", 4, 4)}
LAUNCH_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """Files of every architecture (Q8_0: every shard of 2 and 4 ranks falls on whole blocks) and a
    Q4_K_M llama (4 ranks cut its rows inside K-quant blocks), each with its one-process model saved
    by save_pretrained; the files of the failure cases."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    d = tmp_path_factory.mktemp("tp")
    cases = []
    for arch, mix in [(a, "Q8_0") for a in hf.SUPPORTED_ARCHITECTURES] + [("llama", "Q4_K_M")]:
        params, heads, kv = SHAPES.get(arch, ("1M", 8, 4))
        p = d / f"{arch}-{mix}.gguf"
        synth(p, params, mix, seed=11, vocab=512, arch=arch, heads=heads, kv_heads=kv, weights="small")
        saved = d / f"{arch}-{mix}-st"
        with torch.no_grad():
            hf.from_gguf(p, dtype="float32", device="cpu").save_pretrained(saved)
        cases.append({"name": f"{arch}-{mix}", "gguf": str(p), "saved": str(saved), "input": INPUT, "mix": mix})
    fail = {"good": cases[0]["gguf"], "bad_heads": str(d / "bad-heads.gguf"), "other": str(d / "other.gguf")}
    synth(fail["bad_heads"], "1M", "Q8_0", seed=1, vocab=512, heads=4, kv_heads=1)
    synth(fail["other"], "1M", "Q8_0", seed=2, vocab=512, heads=8, kv_heads=4)
    path = d / "spec.json"
    path.write_text(json.dumps({"cases": cases, "failure_files": fail}))
    return path


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _launch(spec, out, commands, device="cpu") -> None:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "GGUF_LAB_TP_DEVICE": device}
    if device == "cpu":  # on a GPU host too: transformers' own tp model would otherwise build a CUDA mesh
        env["CUDA_VISIBLE_DEVICES"] = ""
    procs = [subprocess.Popen(c + [WORKER, str(spec), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]


def _check(out, world):
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    diffs = []
    for res in ranks:
        assert res["world"] == world and not res["errors"], res["errors"]
        for c in res["cases"]:
            assert not c["problems"], (c["case"], c["problems"][:5])
            assert c["sharded"] > 0 and c["greedy_same"], c
            tol = 1e-5 * max(1.0, c["max_abs_logit"])
            assert c["max_logit_diff"] <= tol, c
            diffs.append(c["max_logit_diff"])
            if c["aligned"]:  # whole blocks: exactly the rank's shards and the replicated tensors
                assert c["read_bytes"] <= 1.01 * c["expected_bytes"], c
                assert c["read_bytes"] == c["wanted_bytes"], c
            assert c["read_bytes"] < c["whole_bytes"], c
        f = res["failures"]
        assert f"rank(s) [{world - 1}] of {world}" in f["failing_rank"] and "disk on fire" in f["failing_rank"], f
        assert f["threads_after_failure"] == [], f
        assert "blk.0.attn_k.weight" in f["bad_heads"] and "num_key_value_heads = 1" in f["bad_heads"], f
        assert f"ranks {list(range(1, world))} opened another file" in f["other_file"], f
        assert f"ranks {list(range(1, world))} could not open" in f["missing_file"], f
        assert res["device_mesh_problems"] == [], res["device_mesh_problems"]
    assert {c["case"] for c in ranks[0]["cases"]} >= {f"{a}-Q8_0" for a in hf.SUPPORTED_ARCHITECTURES}
    print(f"world {world}: max |logit diff| against the one-process model {max(diffs):.3g}")
    return ranks


@pytest.mark.parametrize("world", [2, 4])
def test_torchrun_one_node(spec, tmp_path, world):
    port = _free_port()
    _launch(spec, tmp_path, [_torchrun("--nproc-per-node", str(world), "--master-addr", "127.0.0.1",
                                       "--master-port", str(port))])
    ranks = _check(tmp_path, world)
    # the Q4_K_M llama's row splits (128 or 64 of 256 weights) fall inside K-quant blocks: covering blocks read
    k = [c for c in ranks[0]["cases"] if c["case"] == "llama-Q4_K_M"][0]
    assert not k["aligned"] and k["wanted_bytes"] < k["read_bytes"] < k["whole_bytes"]


def test_torchrun_two_nodes(spec, tmp_path):
    """Two launchers, one rendezvous (c10d) on 127.0.0.1: a world of two nodes of one rank each."""
    port = _free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "gguf-lab-tp", "--max-restarts", "0"]
    _launch(spec, tmp_path, [_torchrun(*common, "--node-rank", str(n), "--local-addr", "127.0.0.1")
                             for n in range(2)])
    _check(tmp_path, 2)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2, reason=f"NCCL tensor parallel needs two GPUs; {_gpu_count()} here")
def test_torchrun_nccl_two_gpus(spec, tmp_path):
    """The same checks with NCCL, each rank on its own GPU (the gpu mode through CuPy): needs two."""
    port = _free_port()
    _launch(spec, tmp_path, [_torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                       "--master-port", str(port))], device="cuda")
    _check(tmp_path, 2)


def test_tp_plan_arguments_are_checked(spec):
    from gguf_gpu_lab import GGUFLabError

    path = json.loads(spec.read_text())["cases"][0]["gguf"]
    with pytest.raises(GGUFLabError, match="tp_plan must be None or 'auto'"):
        hf.from_gguf(path, device="cpu", tp_plan="colwise")
    with pytest.raises(GGUFLabError, match="device_mesh shards"):
        hf.from_gguf(path, device="cpu", device_mesh=object())
    env_ok = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not env_ok:
        with pytest.raises(GGUFLabError, match="run under torchrun"):
            hf.from_gguf(path, device="cpu", tp_plan="auto")
    with pytest.raises(GGUFLabError, match="timeout_s"):
        hf.from_gguf(path, device="cpu", tp_plan="auto", timeout_s=0)

