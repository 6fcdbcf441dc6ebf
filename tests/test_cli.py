import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gguf_gpu_lab.cli import main
from gguf_gpu_lab.outputs import MANIFEST


def run(*args):
    return subprocess.run([sys.executable, "-m", "gguf_gpu_lab", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", ["inspect", "synth", "dequant", "check", "load", "bench", "fuzz", "demo"])
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: gguf-gpu-lab " + cmd in r.stdout


def test_synth_inspect_dequant_check(tmp_path, capsys):
    p = str(tmp_path / "m.gguf")
    assert main(["synth", p, "--params", "4M", "--mix", "Q4_0", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "smallest" not in out
    assert main(["synth", str(tmp_path / "s.gguf"), "--params", "1M"]) == 0  # below the smallest shape: said
    assert "3.8 M weights (the smallest llama shape synth writes; --params 1M asked for 1 M)" in capsys.readouterr().out
    assert main(["inspect", p, "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "general.architecture = llama" in out and "blk.0.attn_q.weight" in out
    assert main(["inspect", p, "--json", "--tensors"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["architecture"] == "llama" and doc["by_type"]["Q4_0"]["count"] > 0 and len(doc["tensors"]) == doc["n_tensors"]
    first = doc["tensors"][0]  # the shapes named as in the text listing
    assert "shape" not in first and first["ggml_shape"] == list(reversed(first["np_shape"]))
    npy = str(tmp_path / "w.npy")
    assert main(["dequant", p, "blk.0.attn_k.weight", "--verify", "--out", npy, "--dtype", "float16"]) == 0
    assert "bit-exact with gguf-py" in capsys.readouterr().out
    assert np.load(npy).dtype == np.float16
    assert main(["check", p]) == 0


def test_inspect_json_of_a_model_without_decoder_blocks(no_block_model, capsys):
    assert main(["inspect", str(no_block_model), "--json", "--tensors"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    rows = {t["name"]: (t["group"], t["layer"]) for t in doc["tensors"]}
    assert rows["v.blk.1.attn_q.weight"] == ("v.blk", 1) and rows["mm.0.weight"] == (None, None)


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
    out = capsys.readouterr().out
    assert "blk.0.attn_q.weight (Q8_0): block 1 scale@0 is nan" in out and out.endswith("1 problem(s) found\n")
    with open(p, "r+b") as f:
        f.seek(off + 34)  # the third block's scale too: two problems, the scan stopped at one
        f.write(np.array([np.inf], np.float16).tobytes())
    assert main(["check", str(p), "--max-problems", "1"]) == 1
    assert capsys.readouterr().out.endswith("1 problem(s) found (stopped there: --max-problems)\n")


@pytest.mark.parametrize("args,needle", [
    (["inspect", "/nonexistent.gguf"], "cannot open"),
    (["synth", "{tmp}/x.gguf", "--mix", "nope"], "unknown mix"),
    (["dequant", "{model}", "missing.weight"], "no tensor named 'missing.weight'"),
    (["inspect", "{garbage}"], "bad magic"),
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
    capsys.readouterr()
    # types gguf-py does not dequantize: checked against their values, its columns empty
    assert main(["bench", "--cpu", "--out-dir", str(tmp_path / "ints"), "--size-mb", "1", "--types", "I8", "F64"]) == 0
    out = capsys.readouterr().out
    assert "\nI8 " in out and "\nF64 " in out and "NO" not in out
    res = json.loads(next((tmp_path / "ints").glob("cpu-dequant-*.json")).read_text())
    assert [(r["type"], r["mismatches"], r["gguf_py_1t_mw_s"], r["speedup_1t"]) for r in res["results"]] == [
        ("I8", 0, None, None), ("F64", 0, None, None)]


def test_load_benchmark_results_format():
    """Every committed loader result formats (the current layout, and the older ones)."""
    import json
    from pathlib import Path

    from gguf_gpu_lab.tools.bench_load import format_load

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
    assert "GB in host memory (host backend))" in out and "on the device" not in out
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == [MANIFEST, "spans.csv", "timeline.png", "trace.json"]


@pytest.mark.parametrize("flags,what", [([], "bench"), (["--dequant"], "bench --dequant"), (["--e2e"], "bench --e2e")])
def test_bench_without_a_gpu_stops_before_any_work(tmp_path, monkeypatch, capsys, flags, what):
    import gguf_gpu_lab.tools.bench_e2e
    import gguf_gpu_lab.tools.bench_gpu
    import gguf_gpu_lab.tools.bench_load
    import gguf_gpu_lab.device

    def never(*a, **k):
        raise AssertionError("the benchmark ran without a GPU")

    monkeypatch.setattr(gguf_gpu_lab.tools.bench_e2e, "bench_e2e", never)
    monkeypatch.setattr(gguf_gpu_lab.device, "_cupy_or_reason", lambda: (None, "CuPy is not importable (ModuleNotFoundError)"))
    monkeypatch.setattr(gguf_gpu_lab.tools.bench_load, "bench_load", never)
    monkeypatch.setattr(gguf_gpu_lab.tools.bench_gpu, "bench_gpu_dequant", never)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *flags]) == 2
    err = capsys.readouterr().err
    assert err == (f"gguf-gpu-lab: error: {what} needs a GPU: CuPy is not importable (ModuleNotFoundError); "
                   "bench --cpu, --open, --export and --tp run without one\n")
    assert not list(tmp_path.iterdir())  # no results folder, no model


def test_bench_open_runs_without_a_gpu(tmp_path, monkeypatch, capsys):
    """The open benchmark on small stand-ins for its files (the real ones are written by bench --open)."""
    import gguf_gpu_lab.tools.bench_e2e as be

    monkeypatch.setattr(be, "_OPEN_CASES", [("vocab-3000", dict(params="4M", mix="Q4_0", vocab=3000), 0.1),
                                           ("4M-header", dict(params="4M", mix="Q4_K_M", data=False), 0.05)])
    assert main(["bench", "--open", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vocab-3000" in out and "4M-header" in out and "saved" in out
    (saved,) = tmp_path.glob("open-*.json")
    doc = json.loads(saved.read_text())
    assert [r["vocab"] for r in doc["results"]] == [3000, 4096]
    assert all(r["open_s_median"] > 0 and r["gguf_reader_s"] > 0 for r in doc["results"])
    assert doc["results"][1]["sparse"] and not doc["results"][0]["sparse"]
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".gguf" or p.is_dir()]  # its models are gone


def test_synth_without_room_is_one_line_before_writing(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    assert main(["synth", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gguf-gpu-lab: error: {tmp_path / 'x.gguf'}: the model needs ") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_an_oserror_without_errno_is_not_an_empty_message(monkeypatch, capsys):
    import gguf_gpu_lab.tools.synth

    def fail(*a, **k):
        raise OSError()

    monkeypatch.setattr(gguf_gpu_lab.tools.synth, "synth", fail)
    assert main(["synth", "x.gguf"]) == 2
    assert capsys.readouterr().err == "gguf-gpu-lab: error: OSError\n"


def test_bfloat16_npy_loads_in_numpy(tmp_path, small_model, capsys):
    import gguf_gpu_lab as lab

    name = "blk.0.attn_k.weight"
    with lab.open_model(small_model) as m:
        want = m.dequantize(name, "bfloat16")
    npy, bits = str(tmp_path / "w.npy"), str(tmp_path / "bits.npy")
    assert main(["dequant", str(small_model), name, "--dtype", "bfloat16", "--out", npy]) == 0
    got = np.load(npy)
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32))
    assert main(["dequant", str(small_model), name, "--dtype", "bfloat16", "--bf16-bits", "--out", bits]) == 0
    got = np.load(bits)
    assert got.dtype == np.uint16 and np.array_equal(got, want.view(np.uint16))
    capsys.readouterr()
    assert main(["dequant", str(small_model), name, "--bf16-bits"]) == 2
    assert "--bf16-bits needs --dtype bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["load", "/nonexistent.gguf", "--streams", "0"], "argument --streams: must be from 1 to 64, got 0"),
    (["load", "/nonexistent.gguf", "--chunk-mb", "0"], "argument --chunk-mb: must be from 0.015625 to 1024, got 0"),
    (["load", "/nonexistent.gguf", "--chunk-mb", "1e-9"], "argument --chunk-mb: must be from 0.015625 to 1024, got 1e-9"),
    (["load", "/nonexistent.gguf", "--chunk-mb", "1e308"], "argument --chunk-mb: must be from 0.015625 to 1024, got 1e308"),
    (["load", "/nonexistent.gguf", "--chunk-mb", "inf"], "argument --chunk-mb: must be from 0.015625 to 1024, got inf"),
    (["load", "/nonexistent.gguf", "--chunk-mb", "nan"], "argument --chunk-mb: must be from 0.015625 to 1024, got nan"),
    (["load", "/nonexistent.gguf", "--readers", "two"], "argument --readers: expected a whole number, got 'two'"),
    (["load", "/nonexistent.gguf", "--repeat", "0"], "argument --repeat: must be from 1 to 1000, got 0"),
    (["load", "/nonexistent.gguf", "--device", "-1"], "argument --device: device indices are from 0 to 1023, got '-1'"),
    (["load", "/nonexistent.gguf", "--device", "99999999999999999999"], "argument --device: device indices are from 0"),
    (["fuzz", "--cases", "-5"], "argument --cases: must be from 1 to 10000000, got -5"),
    (["synth", "x.gguf", "--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
    (["synth", "x.gguf", "--vocab", "0"], "argument --vocab: must be from 1 to 16777216, got 0"),
    (["synth", "x.gguf", "--heads", "0"], "argument --heads: must be from 1 to 4096, got 0"),
    (["check", "/nonexistent.gguf", "--max-problems", "0"], "argument --max-problems: must be from 1 to 1000000000, got 0"),
    (["bench", "--cpu", "--size-mb", "0"], "argument --size-mb: must be from 1 to 65536, got 0"),
    (["inspect"], "the following arguments are required: path"),
    (["load", "/nonexistent.gguf", "--bogus"], "unrecognized arguments: --bogus (see gguf-gpu-lab load --help)"),
])
def test_bad_numbers_are_refused_up_front_by_their_flag(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)  # were a check missing, what the command writes stays here
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err
    # one line, as the README promises, not argparse's usage block
    assert err.startswith(f"gguf-gpu-lab {args[0]}: error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_bench_open_refuses_options_it_does_not_use(tmp_path, monkeypatch, capsys):
    import gguf_gpu_lab.tools.bench_e2e as be

    monkeypatch.setattr(be, "bench_open", lambda: pytest.fail("bench --open ran with an option it ignores"))
    assert main(["bench", "--open", "--size-mb", "5", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("gguf-gpu-lab: error: --size-mb is for bench --cpu and bench --dequant, "
                                       "not bench --open\n")


@pytest.mark.parametrize("args,message", [
    (["bench", "--cpu", "--tp-worlds", "2"], "--tp-worlds is for bench --tp, not bench --cpu"),
    (["bench", "--open", "--tp-device", "cpu"], "--tp-device is for bench --tp, not bench --open"),
    (["bench", "--cpu", "--connections", "4"], "--connections is for bench --remote, not bench --cpu"),
    (["bench", "--export", "--rate-gbps", "2"], "--rate-gbps is for bench --remote, not bench --export"),
    (["load", "/nonexistent.gguf", "--overwrite"], "--overwrite is for the files of --profile DIR"),
])
def test_options_of_another_command_are_refused_not_ignored(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"gguf-gpu-lab: error: {message}")
    assert not list(tmp_path.iterdir())


def test_profile_folder_is_checked_before_loading(tmp_path, small_model, capsys):
    (tmp_path / "file").write_text("")
    prof = tmp_path / "file" / "prof"  # under a file: cannot be made
    assert main(["load", str(small_model), "--backend", "host", "--profile", str(prof)]) == 2
    out, err = capsys.readouterr()
    assert "loaded" not in out
    assert err.startswith(f"gguf-gpu-lab: error: --profile {prof}: cannot create the folder") and err.count("\n") == 1


def test_every_option_and_positional_has_help():
    from gguf_gpu_lab.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [f"{cmd} {a.dest}" for cmd, p in sub.choices.items() for a in p._actions if not a.help]
    assert not missing
    assert "--tensors" in {a.dest: a.help for a in sub._choices_actions}["inspect"]  # the table is behind it


def test_bench_results_go_to_a_user_folder_by_default():
    from gguf_gpu_lab.cli import build_parser

    args = build_parser().parse_args(["bench"])
    assert args.out_dir == "gguf-lab-bench"


def test_inspect_names_the_file_type_and_keeps_long_strings_on_one_line(tmp_path, capsys):
    from .gguf_bytes import GGUFBytes, f32_tensor

    template = "{% for message in messages %}\n{{ message['content'] }}\n{% endfor %}" * 20
    p = GGUFBytes(tensors=[f32_tensor("w", 32)]).add_str("general.architecture", "llama")
    p = p.add_u32("general.file_type", 15).add_str("tokenizer.chat_template", template).write(tmp_path / "m.gguf")
    assert main(["inspect", p]) == 0
    out = capsys.readouterr().out
    assert "  general.file_type = 15 (MOSTLY_Q4_K_M)\n" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("  tokenizer.chat_template = ")]
    assert len(line) < 140 and f"({len(template):,} characters, 41 lines)" in line
    assert main(["inspect", p, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["tokenizer.chat_template"] == template


def test_synth_arch(tmp_path, capsys):
    import gguf_gpu_lab as lab

    p = str(tmp_path / "g.gguf")
    assert main(["synth", p, "--params", "1M", "--mix", "Q8_0", "--arch", "gemma2", "--heads", "4", "--kv-heads", "2",
                 "--weights", "small"]) == 0
    with lab.open_model(p) as m:
        assert m.architecture == "gemma2" and m.metadata["gemma2.attention.head_count_kv"] == 2
    assert main(["synth", p, "--arch", "bert"]) == 2
    assert "unknown architecture 'bert'" in capsys.readouterr().err


def test_bench_model_writes_a_temporary_model_or_uses_the_one_given(small_model):
    import os

    from gguf_gpu_lab.tools.bench import bench_model

    with bench_model(None, "4M", "Q4_0", arch="llama") as (path, info):
        assert os.path.basename(path) == "synthetic-llama-4M-Q4_0.gguf" and os.path.getsize(path) > 0
        assert info["params"] == "4M" and info["seconds"] > 0
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    with bench_model(str(small_model), "8B", "Q4_K_M") as (given, info):
        assert given == str(small_model) and info is None


def test_synth_refuses_an_existing_path_unless_overwrite(tmp_path, capsys):
    from gguf_gpu_lab.outputs import OutputExistsError
    from gguf_gpu_lab.tools.synth import synth

    mine = tmp_path / "real-model.gguf"
    mine.write_bytes(b"GGUF a model that synth did not write")
    assert main(["synth", str(mine), "--params", "1M", "--mix", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert err == f"gguf-gpu-lab: error: {mine}: exists; the model would replace it (overwrite=True, or --overwrite, allows that)\n"
    assert mine.read_bytes() == b"GGUF a model that synth did not write"
    with pytest.raises(OutputExistsError, match="exists"):
        synth(mine, "1M", "Q8_0")
    with pytest.raises(FileExistsError):  # also the OSError a caller may expect
        synth(mine, "1M", "Q8_0")
    assert mine.read_bytes() == b"GGUF a model that synth did not write"
    assert main(["synth", str(mine), "--params", "1M", "--mix", "Q8_0", "--overwrite"]) == 0
    assert mine.read_bytes()[:4] == b"GGUF" and mine.stat().st_size > 1000
    assert main(["synth", str(tmp_path / "no-such-folder" / "m.gguf"), "--params", "1M"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_warning_is_one_line(tmp_path, capsys):
    (tmp_path / ".m.gguf.partial-0123456789ab").mkdir()  # what a killed synth of m.gguf would leave
    assert main(["synth", str(tmp_path / "m.gguf"), "--params", "1M", "--mix", "Q8_0"]) == 0
    err = capsys.readouterr().err
    assert err == (f"gguf-gpu-lab: warning: {tmp_path}/.m.gguf.partial-0123456789ab: left by an unfinished synth of "
                   f"{tmp_path}/m.gguf (0.00 GB on disk); remove it if no synth of that path is running\n")


def test_dequant_out_is_the_file_named_and_checked_before_the_work(tmp_path, small_model, monkeypatch, capsys):
    import gguf_gpu_lab.model

    name = "blk.0.attn_k.weight"
    assert main(["dequant", str(small_model), name, "--out", str(tmp_path / "q.txt")]) == 2
    assert "give a name ending in .npy" in capsys.readouterr().err and not list(tmp_path.iterdir())
    taken = tmp_path / "taken.npy"
    taken.write_bytes(b"keep me")
    monkeypatch.setattr(gguf_gpu_lab.model.GGUFModel, "dequantize", lambda *a, **k: pytest.fail("worked first"))
    assert main(["dequant", str(small_model), name, "--out", str(taken)]) == 2
    assert capsys.readouterr().err.startswith(f"gguf-gpu-lab: error: {taken}: exists")
    monkeypatch.undo()
    assert main(["dequant", str(small_model), name, "--out", str(taken), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"saved {taken} (float32)" in out and "NumPy shape (" in out and "GGUF order (" in out
    assert np.load(taken).dtype == np.float32 and sorted(p.name for p in tmp_path.iterdir()) == ["taken.npy"]


def test_fuzz_and_bench_out_are_checked_before_the_work(tmp_path, monkeypatch, capsys):
    from gguf_gpu_lab.tools import bench, fuzz

    taken = tmp_path / "r.json"
    taken.write_text("{}")
    monkeypatch.setattr(fuzz, "run", lambda *a, **k: pytest.fail("fuzzed first"))
    monkeypatch.setattr(bench, "bench_cpu", lambda *a, **k: pytest.fail("benchmarked first"))
    assert main(["fuzz", "--cases", "3", "--out", str(taken)]) == 2
    assert main(["bench", "--cpu", "--size-mb", "1", "--out", str(taken)]) == 2
    assert capsys.readouterr().err.count(f"{taken}: exists") == 2 and taken.read_text() == "{}"
    monkeypatch.undo()
    assert main(["fuzz", "--cases", "3", "--out", str(taken), "--overwrite"]) == 0
    assert json.loads(taken.read_text())["cases"] == 3


def test_bench_results_of_the_same_day_do_not_replace_each_other(tmp_path):
    from gguf_gpu_lab.tools.bench import machine_info, save_result

    res = {"benchmark": "x", "machine": machine_info(), "n": 1}
    first = save_result(res, str(tmp_path), "x")
    second = save_result({**res, "n": 2}, str(tmp_path), "x")  # the same second: a numbered name
    assert first != second and len(list(tmp_path.glob("x-*.json"))) == 2
    assert re.fullmatch(r"x-\d{4}-\d\d-\d\dT\d{6}-.+\.json", os.path.basename(first))
    assert json.loads(open(first).read())["n"] == 1 and json.loads(open(second).read())["n"] == 2


def test_demo_replaces_its_own_files_and_refuses_others(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "timeline.png").write_bytes(b"a picture of mine")
    assert main(["demo", "--out-dir", str(out), "--params", "1M"]) == 2
    assert "timeline.png: exists and was not written by gguf-gpu-lab" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["timeline.png"]
    (out / "timeline.png").unlink()
    assert main(["demo", "--out-dir", str(out), "--params", "1M"]) == 0
    assert main(["demo", "--out-dir", str(out), "--params", "1M"]) == 0  # its own files, replaced
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_folder_refuses_files_it_did_not_write(tmp_path, small_model, capsys):
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "spans.csv").write_text("mine")
    assert main(["load", str(small_model), "--backend", "host", "--profile", str(prof)]) == 2
    assert "spans.csv: exists and was not written by gguf-gpu-lab" in capsys.readouterr().err
    assert main(["load", str(small_model), "--backend", "host", "--profile", str(prof), "--overwrite"]) == 0
    assert main(["load", str(small_model), "--backend", "host", "--profile", str(prof)]) == 0  # now its own
    assert (prof / "spans.csv").read_text() != "mine"


def test_a_closed_pipe_ends_quietly(small_model):
    """``inspect ... | head -1``: the reader goes; no "error: Broken pipe", no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "gguf_gpu_lab", "inspect", str(small_model), "--tensors"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the first write: every write meets a closed pipe
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=120) == 141 and err == ""


def test_inspect_and_dequant_name_the_order_of_their_shapes(small_model, capsys):
    import gguf_gpu_lab as lab

    with lab.open_model(small_model) as m:
        t = m.info("blk.0.ffn_down.weight")
    assert t.shape != t.np_shape  # GGUF order is NumPy's reversed
    assert main(["inspect", str(small_model), "--tensors"]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.lstrip().startswith("name"))
    assert "ggml_shape" in header and "np_shape" in header and "GGUF order" in out and "NumPy order" in out
    row = next(ln for ln in out.splitlines() if ln.lstrip().startswith("blk.0.ffn_down.weight"))
    assert str(t.shape) in row and str(t.np_shape) in row
    assert main(["dequant", str(small_model), "blk.0.ffn_down.weight"]) == 0
    assert f"NumPy shape {t.np_shape} (GGUF order {t.shape})" in capsys.readouterr().out


def test_sigterm_cleans_up_as_an_interrupt_does(tmp_path):
    """SIGTERM (docker stop, a scheduler) mid-export: 'terminated', status 143, and no partial
    folder left (SIGKILL leaves one, which the next export names)."""
    import signal
    import subprocess
    import sys
    import time

    from gguf_gpu_lab.tools.synth import synth

    from .needs import require

    require("torch", "transformers")  # the export does the interrupted work
    p = synth(tmp_path / "m.gguf", "25M", "Q4_K_M", weights="small").path
    proc = subprocess.Popen([sys.executable, "-m", "gguf_gpu_lab", "export", p, str(tmp_path / "out"), "--device",
                             "cpu", "--budget", "64KB"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith(".out.partial-") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "gguf-gpu-lab: terminated" in err, err
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
