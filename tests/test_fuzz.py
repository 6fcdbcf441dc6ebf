"""A sample of the fuzz run (the dedicated run: `gguf-gpu-lab fuzz --cases 10000`)."""

from gguf_gpu_lab.tools import fuzz


def test_seed_file_is_valid_and_mutations_hit_every_kind():
    data = fuzz.seed_file()
    lay = fuzz.layout(data)
    assert lay.data_offset < lay.size and len(lay.ti_starts) == 5 and len(lay.kv_starts) >= 4
    import numpy as np

    rng = np.random.Generator(np.random.SFC64(0))
    kinds = {fuzz.mutate(data, lay, rng)[0] for _ in range(300)}
    assert kinds == set(fuzz.MUTATIONS)


def test_fuzz_sample_keeps_the_contract():
    rep = fuzz.run(400, seed=7)
    assert rep.ok(), rep.failures[:5]
    assert sum(rep.outcomes.values()) == 400
    assert rep.outcomes["GGUFFormatError"] > 0 and rep.outcomes["ok"] > 0  # both ends are exercised
    assert set(rep.outcomes) <= {"ok", "GGUFFormatError", "UnsupportedTypeError", "GGUFLabError"}
    assert rep.slowest_s < 2.0 and rep.peak_bytes < 256 << 20
