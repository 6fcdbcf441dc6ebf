"""The multi-GPU benchmark's arithmetic and report, from a result shaped as a run writes it (the
run itself needs two GPUs: ``gguf-gpu-lab bench --multi-gpu``)."""

from gguf_gpu_lab.tools.bench_multi import TARGET_OF_CEILING, TARGET_SPEEDUP, _ratios, format_multi


def _result(one=40.0, two=52.0, ceiling=55.0, bad=()):
    load = lambda gb_s: {"wall_s": 4.9 / gb_s, "gb_s": gb_s, "fp16_gb_s": 3.3 * gb_s, "profiled_wall_s": 5.0 / gb_s}  # noqa: E731
    return {
        "machine": {"cores": 32, "date": "2026-12-01T00:00:00+00:00"},
        "devices": [{"name": "NVIDIA H200"}, {"name": "NVIDIA H200"}], "seconds": 200.0,
        "h2d": {"alone_gb_s": {"0": 55.0, "1": 55.1},
                "together": {"total_gb_s": 107.0, "per_gpu_gb_s": {"0": 53.5, "1": 53.5}}},
        "ceilings": {"14": {"copy_gb_s": 44.0, "h2d": {"total_gb_s": 78.0}},
                     "28": {"copy_gb_s": ceiling, "h2d": {"total_gb_s": 66.0}}},
        "model": {"path": "synthetic-8B-Q4_K_M.gguf", "file_bytes": 4.9e9},
        "one_gpu": load(one), "all_gpus": load(two), "all_gpus_one_gpu_readers": load(two - 5),
        "same_outputs": {"tensors": 291, "differ": list(bad)},
        "big": {"params": "70B", "file_bytes": 40e9, "synth_s": 30.0, "bit_exact": True, "checks": [{}] * 8,
                "loads": [{"wall_s": 1.0, "gb_s": 40.0, "fp16_gb_s": 141.0, "out_bytes": 141e9}]},
    }


def test_ratios_against_the_targets():
    res = _result()
    r = _ratios(res, 28)
    assert r["speedup_all_over_one"] == 52.0 / 40.0 and r["of_copy_ceiling"] == 52.0 / 55.0
    assert r["one_gpu_of_its_ceiling"] == 40.0 / 44.0
    assert r["met"] == {"speedup": 1.3 >= TARGET_SPEEDUP, "ceiling": 52 / 55 >= TARGET_OF_CEILING,
                        "big_bit_exact": True, "outputs_equal": True}
    assert not _ratios(_result(two=45.0, bad=["x"]), 28)["met"]["speedup"]
    assert not _ratios(_result(bad=["x"]), 28)["met"]["outputs_equal"]


def test_report_names_every_figure():
    res = _result()
    res["ratios"] = _ratios(res, 28)
    text = format_multi(res)
    for part in ("2 x NVIDIA H200", "together 107.0 GB/s", "28 threads, while every GPU copies: 55.0 GB/s",
                 "one GPU", "all GPUs", "291 of 291 tensors identical", "all/one 1.30", "70B Q4_K_M",
                 "bit-exact", "targets met: speedup yes", "(profiled: 0.096 s)"):
        assert part in text, part
