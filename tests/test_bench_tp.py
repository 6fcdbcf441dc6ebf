"""bench --tp on the host backend with gloo: a world of 2 ranks on a small synthetic llama, one
torchrun launch of tools.tp_run (one launch: each imports torch on every rank of a 2-core machine;
worlds 1 and 4 and the GPUs are the same code with other arguments)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gguf_gpu_lab import GGUFLabError  # noqa: E402
from gguf_gpu_lab.cli import main  # noqa: E402
from gguf_gpu_lab.tools.bench_tp import bench_tp, format_tp  # noqa: E402


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
        assert r["whole_bytes"] < whole and r["wanted_bytes"] < r["read_bytes"] < 0.7 * r["whole_bytes"]
        assert r["sharded_tensors"] > 0 and r["load_wall_s"] > 0
    assert len(res["tokens"]) == 4
    assert "world rank" in capsys.readouterr().out


def test_bench_tp_checks_its_arguments():
    with pytest.raises(GGUFLabError, match="worlds"):
        bench_tp(worlds=(0,))
    with pytest.raises(GGUFLabError, match="device"):
        bench_tp(worlds=(1,), device="tpu")
    with pytest.raises(GGUFLabError, match="timeout_s"):
        bench_tp(worlds=(1,), timeout_s=0)


def test_format_tp_names_what_was_left_out():
    res = {"model": "m.gguf", "file_bytes": 2e6, "device": "cuda", "machine": {"card": "H200", "cpu": "x", "date": "d"},
           "peak": {"page_cache_gb_s_1_thread": 5.0}, "skipped_worlds": [4], "tokens": [1, 2],
           "results": [{"world": 2, "rank": 0, "read_bytes": 1e6, "wanted_bytes": 1e6, "whole_bytes": 2e6,
                        "read_fraction": 0.5, "load_wall_s": 0.1, "read_gb_s": 0.01, "from_gguf_s": 1.0}]}
    text = format_tp(res)
    assert "H200" in text and "worlds [4]" in text and "    2    0      1.00" in text
