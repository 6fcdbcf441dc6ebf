"""bench --tp on the host backend with gloo: a world of 2 ranks on a small synthetic llama, one
torchrun launch of tools.tp_run (one launch: each imports torch on every rank of a 2-core machine;
worlds 1 and 4 and the GPUs are the same code with other arguments); the per-world summary, its
targets and the result's file name on fabricated ranks, without GPUs."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gguf_gpu_lab import GGUFLabError  # noqa: E402
from gguf_gpu_lab.cli import main  # noqa: E402
from gguf_gpu_lab.tools.bench import save_result  # noqa: E402
from gguf_gpu_lab.tools.bench_tp import (NO_GPU_CEILING, bench_tp, format_tp, machine_kind,  # noqa: E402
                                         measure_ceilings, summarize, world_summary)


def test_bench_tp_on_the_host(tmp_path, capsys):
    out = tmp_path / "tp.json"
    assert main(["bench", "--tp", "--params", "1M", "--tp-worlds", "2", "--tp-device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "tp" and res["device"] == "cpu" and res["worlds"] == [2]
    assert {"torch", "transformers", "date"} <= set(res["machine"]) and res["peak"]["page_cache_gb_s_1_thread"] > 0
    rows = {(r["world"], r["rank"]): r for r in res["results"]}
    assert set(rows) == {(2, 0), (2, 1)}
    whole = res["file_bytes"]
    for r in rows.values():  # 1M llama, 256 wide: row splits of 128 inside K-quant blocks
        assert r["whole_bytes"] < whole and r["wanted_bytes"] < r["bytes_read"] < 0.7 * r["whole_bytes"]
        assert r["sharded_tensors"] > 0 and r["load_wall_s"] > 0 and r["backend"] == "gloo" and r["nccl"] is None
        assert 0 < r["replicated_bytes"] < r["wanted_bytes"] and r["shard_bytes"] + r["replicated_bytes"] == r["wanted_bytes"]
    assert len(res["tokens"]) == 4
    assert res["backend"] == "gloo" and res["nccl"] is None and "kind" not in res["machine"]
    assert res["ceilings"] == {"skipped": NO_GPU_CEILING}  # the host path measures no ceiling, and says why
    s = res["summary"]["2"]
    assert s["ranks"] == 2 and s["bytes_read"] == sum(r["bytes_read"] for r in rows.values())
    assert s["of_copy_ceiling"] is None and s["met"]["of_copy_ceiling"] is None and s["vs_world_1"] is None
    # K-quant blocks cut inside: more than the shards, but within the 1 % only if the cut bytes are few
    assert s["met"]["reads_within_shards_plus_1pct"] == all(r["bytes_read"] <= 1.01 * r["wanted_bytes"] for r in rows.values())
    out_text = capsys.readouterr().out
    assert "world rank" in out_text and NO_GPU_CEILING in out_text


def test_bench_tp_checks_its_arguments():
    with pytest.raises(GGUFLabError, match="worlds"):
        bench_tp(worlds=(0,))
    with pytest.raises(GGUFLabError, match="device"):
        bench_tp(worlds=(1,), device="tpu")
    with pytest.raises(GGUFLabError, match="timeout_s"):
        bench_tp(worlds=(1,), timeout_s=0)


def test_a_world_that_cannot_split_the_heads_is_refused_before_any_launch(monkeypatch):
    import gguf_gpu_lab.tools.bench_tp as bt
    from gguf_gpu_lab.loader import ShardError

    monkeypatch.setattr(bt, "run_world", lambda *a, **k: pytest.fail("a rank was launched"))
    monkeypatch.setattr(bt, "measure_ceilings", lambda *a, **k: pytest.fail("the ceilings were measured"))
    with pytest.raises(ShardError, match=r"synthetic-25M-Q4_K_M\.gguf: num_attention_heads = 4, which a world of 3 "
                                         r"ranks does not divide"):
        bench_tp(worlds=(1, 3), device="cpu")


def test_format_tp_names_what_was_left_out():
    res = {"model": "m.gguf", "file_bytes": 2e6, "device": "cuda", "machine": {"card": "H200", "cpu": "x", "date": "d"},
           "peak": {"page_cache_gb_s_1_thread": 5.0}, "skipped_worlds": [4], "tokens": [1, 2],
           "results": [{"world": 2, "rank": 0, "bytes_read": 1e6, "wanted_bytes": 1e6, "whole_bytes": 2e6,
                        "read_fraction": 0.5, "load_wall_s": 0.1, "read_gb_s": 0.01, "from_gguf_s": 1.0}]}
    text = format_tp(res)
    assert "H200" in text and "worlds [4]" in text and "    2    0      1.00" in text


def _rank(world, rank, read, shards, replicated, wall):
    return {"world": world, "rank": rank, "bytes_read": read, "shard_bytes": shards, "replicated_bytes": replicated,
            "load_wall_s": wall}


def test_world_summary_sets_the_ranks_against_the_ceiling():
    rows = [_rank(2, 1, 6.06e9, 5e9, 1e9, 0.25), _rank(2, 0, 6.0e9, 5e9, 1e9, 0.2)]
    s = world_summary(rows, ceiling_gb_s=50.0)
    assert s["bytes_read"] == 12.06e9 and s["slowest_load_wall_s"] == 0.25
    assert s["combined_gb_s"] == pytest.approx(12.06 / 0.25)  # all bytes over the slowest rank's time
    assert s["of_copy_ceiling"] == pytest.approx(12.06 / 0.25 / 50.0)
    assert list(s["per_rank"]) == ["0", "1"] and s["per_rank"]["0"]["gb_s"] == pytest.approx(30.0)
    assert s["per_rank"]["1"]["allowed_bytes"] == pytest.approx(6.06e9)
    assert s["per_rank"]["1"]["reads_within_shards_plus_1pct"]  # exactly 1 % over: still within
    assert s["met"] == {"reads_within_shards_plus_1pct": True, "of_copy_ceiling": True}  # 0.965 >= 0.9
    over = world_summary([_rank(2, 0, 6.07e9, 5e9, 1e9, 0.2), _rank(2, 1, 6e9, 5e9, 1e9, 0.2)], ceiling_gb_s=80.0)
    assert not over["per_rank"]["0"]["reads_within_shards_plus_1pct"] and over["per_rank"]["1"]["reads_within_shards_plus_1pct"]
    assert over["met"] == {"reads_within_shards_plus_1pct": False, "of_copy_ceiling": False}  # 60.35 / 80 < 0.9
    none = world_summary(rows, ceiling_gb_s=None)
    assert none["of_copy_ceiling"] is None and none["met"]["of_copy_ceiling"] is None
    with pytest.raises(GGUFLabError, match="no ranks"):
        world_summary([], 1.0)


def test_summarize_keeps_world_1_as_the_reference():
    rows = [_rank(1, 0, 10e9, 0, 10e9, 0.5), _rank(2, 0, 5.5e9, 4.5e9, 1e9, 0.2), _rank(2, 1, 5.5e9, 4.5e9, 1e9, 0.22)]
    ceils = {"1": {"copy_gb_s": 25.0}, "2": {"copy_gb_s": 50.0}}
    s = summarize(rows, ceils)
    assert list(s) == ["1", "2"] and s["1"]["world"] == 1 and s["2"]["ranks"] == 2
    assert s["1"]["combined_gb_s"] == pytest.approx(20.0) and s["1"]["of_copy_ceiling"] == pytest.approx(0.8)
    assert s["1"]["vs_world_1"] == pytest.approx(1.0) and s["1"]["met"]["of_copy_ceiling"] is False
    assert s["2"]["combined_gb_s"] == pytest.approx(50.0) and s["2"]["of_copy_ceiling"] == pytest.approx(1.0)
    assert s["2"]["vs_world_1"] == pytest.approx(2.5) and s["2"]["met"]["of_copy_ceiling"] is True
    skipped = summarize(rows[1:], {"skipped": NO_GPU_CEILING})
    assert skipped["2"]["copy_ceiling_gb_s"] is None and skipped["2"]["vs_world_1"] is None
    text = format_tp({"model": "m.gguf", "file_bytes": 1e10, "device": "cuda", "skipped_worlds": [], "tokens": [1],
                      "machine": {"card": "NVIDIA H200", "cpu": "x", "date": "d"}, "peak": {"page_cache_gb_s_1_thread": 5.0},
                      "results": [], "summary": s, "ceilings": {k: {**v, "threads": 14, "devices": [0],
                                                                     "h2d": {"together": {"total_gb_s": 55.0}}}
                                                                 for k, v in ceils.items()}})
    assert "world 2: 11000.00 MB read in 0.220 s" in text and "1.00 of the copy ceiling, 2.50x world 1" in text
    assert "copy ceiling 50.0 GB/s" in text


def test_result_files_are_named_by_the_gpus(tmp_path):
    assert machine_kind("NVIDIA H200", 2) == "h200x2" and machine_kind("NVIDIA H100 80GB HBM3", 1) == "h100"
    assert machine_kind("NVIDIA A100-SXM4-80GB", 4) == "a100x4" and machine_kind("AMD Instinct MI300X", 8) == "mi300xx8"
    assert machine_kind(None, 0) is None
    res = {"benchmark": "tp", "machine": {"host": "vm", "date": "2026-12-08T10:11:12+00:00", "kind": "h200x2"}}
    assert save_result(res, str(tmp_path), "tp").endswith("tp-2026-12-08T101112-h200x2.json")
    res["machine"]["kind"] = None  # no GPUs: the host's name, as before
    assert save_result(res, str(tmp_path), "tp").endswith("tp-2026-12-08T101112-vm.json")


def test_no_ceiling_on_a_file_too_small_for_it(tmp_path):
    p = tmp_path / "small.gguf"
    p.write_bytes(b"\0" * (1 << 20))
    assert "smaller than 64 MiB" in measure_ceilings(str(p), [1, 2], timeout_s=60)["skipped"]


@pytest.mark.gpu
def test_ceilings_in_a_child_process(tmp_path):
    """The child process the GPU run starts before its ranks: world 1, and world 2 where there are two GPUs."""
    import cupy as cp

    from gguf_gpu_lab.loader import default_readers
    from gguf_gpu_lab.tools.synth import synth

    p = tmp_path / "m.gguf"
    synth(str(p), "150M", "Q4_K_M")
    worlds = [1, 2] if cp.cuda.runtime.getDeviceCount() >= 2 else [1]
    c = measure_ceilings(str(p), worlds, timeout_s=300)
    assert sorted(c) == [str(w) for w in worlds]
    for w in worlds:
        x = c[str(w)]
        assert x["devices"] == list(range(w)) and x["threads"] == w * default_readers(1) and x["copy_gb_s"] > 0
        assert set(x["h2d"]["alone_gb_s"]) == {str(d) for d in range(w)} and x["h2d"]["together"]["total_gb_s"] > 0
