import json
import subprocess
import sys

import numpy as np
import pytest

from gguf_gpu_lab.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "gguf_gpu_lab", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", ["inspect", "synth", "dequant", "check", "load", "bench", "fuzz", "demo"])
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: gguf-gpu-lab " + cmd in r.stdout


def test_synth_inspect_dequant_check(tmp_path, capsys):
    p = str(tmp_path / "m.gguf")
    assert main(["synth", p, "--params", "4M", "--mix", "Q4_0", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["inspect", p, "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "general.architecture = llama" in out and "blk.0.attn_q.weight" in out
    assert main(["inspect", p, "--json", "--tensors"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["architecture"] == "llama" and doc["by_type"]["Q4_0"]["count"] > 0 and len(doc["tensors"]) == doc["n_tensors"]
    npy = str(tmp_path / "w.npy")
    assert main(["dequant", p, "blk.0.attn_k.weight", "--verify", "--out", npy, "--dtype", "float16"]) == 0
    assert "bit-exact with gguf-py" in capsys.readouterr().out
    assert np.load(npy).dtype == np.float16
    assert main(["check", p]) == 0


def test_check_exit_code_on_problem(tmp_path, capsys):
    import gguf_gpu_lab as lab

    p = tmp_path / "m.gguf"
    main(["synth", str(p), "--params", "4M", "--mix", "Q8_0"])
    with lab.open_model(p) as m:
        off = m.info("blk.0.attn_q.weight").offset + 34  # second Q8_0 block's scale
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(np.array([np.nan], np.float16).tobytes())
    capsys.readouterr()
    assert main(["check", str(p)]) == 1
    assert "blk.0.attn_q.weight (Q8_0): block 1 scale@0 is nan" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["inspect", "/nonexistent.gguf"], "cannot open"),
    (["synth", "{tmp}/x.gguf", "--mix", "nope"], "unknown mix"),
    (["dequant", "{model}", "missing.weight"], "no tensor named 'missing.weight'"),
    (["inspect", "{garbage}"], "bad magic"),
    (["load", "{model}", "--repeat", "0", "--backend", "host"], "--repeat must be at least 1"),
])
def test_errors_are_one_line_without_traceback(tmp_path, small_model, args, needle):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 4)
    args = [a.format(tmp=tmp_path, model=small_model, garbage=garbage) for a in args]
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("gguf-gpu-lab: error:") and needle in r.stderr and r.stderr.count("\n") == 1


def test_demo(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--params", "4M"]) == 0
    out = capsys.readouterr().out
    assert "bit-exact" in out and "no NaN/Inf" in out
    assert list(tmp_path.glob("*.gguf"))


def test_bench_cpu_small(tmp_path, capsys):
    assert main(["bench", "--cpu", "--out-dir", str(tmp_path), "--size-mb", "4", "--types", "Q4_0"]) == 0
    res = json.loads(next(tmp_path.glob("cpu-dequant-*.json")).read_text())
    (row,) = res["results"]
    assert row["type"] == "Q4_0" and row["mismatches"] == 0 and row["ours_1t_mw_s"] > 0
    assert res["machine"]["numpy"] == np.__version__


def test_load_benchmark_results_format():
    """Every committed loader result formats (the current layout, and the older ones)."""
    import json
    from pathlib import Path

    from gguf_gpu_lab.bench_load import format_load

    files = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "results").glob("load-*.json"))
    assert files
    for f in files:
        res = json.loads(f.read_text())
        text = format_load(res)
        assert "gpu " in text and "naive" in text and "sweep" in text, f.name
    res["profiler"] = {"load_overhead": 0.014, "spans": 951, "first_df_s": 0.010, "with_first_df_overhead": 0.093}
    res["hostregister"].update({"parallel_threads": 8, "parallel_register_gb_s": 35.4})
    text = format_load(res)
    assert "+1.4% of a gpu-mode load() call" in text and "951 spans" in text and "8 threads 35.4 GB/s" in text


def test_load_repeat_and_profile(tmp_path, small_model, capsys):
    assert main(["load", str(small_model), "--backend", "host", "--repeat", "3", "--chunk-mb", "0.5",
                 "--profile", str(tmp_path / "prof")]) == 0
    out = capsys.readouterr().out
    assert "load 1 of 3: loaded" in out and "load 3 of 3: loaded" in out
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["spans.csv", "timeline.png", "trace.json"]


def test_synth_arch(tmp_path, capsys):
    import gguf_gpu_lab as lab

    p = str(tmp_path / "g.gguf")
    assert main(["synth", p, "--params", "1M", "--mix", "Q8_0", "--arch", "gemma2", "--heads", "4", "--kv-heads", "2",
                 "--weights", "small"]) == 0
    with lab.open_model(p) as m:
        assert m.architecture == "gemma2" and m.metadata["gemma2.attention.head_count_kv"] == 2
    assert main(["synth", p, "--arch", "bert"]) == 2
    assert "unknown architecture 'bert'" in capsys.readouterr().err
