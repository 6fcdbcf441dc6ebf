"""``bench --first`` on the host backend with tiny models: Jupyter kernels through nbclient, the
from_gguf child and transformers' import apart. The figures mean something on a GPU only; here
the code paths run and the result holds every figure."""

import importlib.util

import pandas as pd
import pytest

from gguf_gpu_lab.tools.bench_first import bench_first, format_first, largest_gap

pytest.importorskip("nbclient", reason="nbclient (the test extra) runs the kernels")


def test_largest_gap():
    df = pd.DataFrame({"lane": ["reader 0", "setup", "lane 0"], "stage": ["read", "plan", "h2d"],
                       "start_us": [1000.0, 0.0, 4000.0], "end_us": [3000.0, 500.0, 5000.0]})
    assert largest_gap(df, 0.0051) == {"gap_ms": 1.0, "after": "reader 0: read", "before": "lane 0: h2d"}
    assert largest_gap(df, 0.0075) == {"gap_ms": 2.5, "after": "lane 0: h2d", "before": "end"}  # a stall at the end


def test_bench_first_on_the_host(tmp_path, small_model, monkeypatch):
    hf = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    res = bench_first(str(small_model), backend="host", pause_s=0.2, repeat=1, small_repeat=1, small_params="4M",
                      hf=hf, timeout=300, process_repeat=1)
    k = res["kernel"]
    assert "error" not in k, k
    assert k["pause_s"] == 0.2 and k["first_load"]["call_s"] > 0 and k["first_load"]["warmup"] is None  # no GPU
    assert k["first_bar"]["call_s"] > 0 and k["first_bar"]["largest_gap"]["gap_ms"] >= 0
    assert len(k["bar_big"]["all_call_s"]["bar"]) == 1 and len(k["bar_small_drawn"]["all_call_s"]["no_bar"]) == 1
    assert k["first_copy"]["method"] == "events" and k["first_copy"]["first_copy_ms"] >= 0
    assert 0 < k["first_copy"]["queue_first_copy_end_ms"] <= k["first_copy"]["first_copy_ms"] + 1e-3
    assert "first_load" in res["kernel_no_pause"] and "pause_s" not in res["kernel_no_pause"]
    if hf:
        assert res["from_gguf"]["from_gguf_first_s"] > 0, res["from_gguf"]
        during = res["from_gguf_load_during_imports"]
        assert during["all_from_gguf_first_s"] == [during["from_gguf_first_s"]] and "imports_s" not in during["steps_s"]
        assert "imports_s" in res["from_gguf"]["steps_s"]
        assert res["transformers_import"]["import_s"] > 0 and "from_gguf_first" in res["meets_targets"]
    assert res["machine"]["date"] and res["device"]["backend"] == "host" and "tqdm" in res["versions"]
    text = format_first(res)
    assert "first load in a fresh kernel" in text and "vs none, small file" in text and "made at once" in text
    assert ("started before the imports" in text) == hf  # from_gguf's rows need the hf extra
