import hashlib
import os
import warnings

import gguf
import numpy as np

import pytest

import gguf_gpu_lab as lab
from gguf_gpu_lab import GGUFLabError, OutputExistsError, quant
from gguf_gpu_lab.tools import synth_archs
from gguf_gpu_lab.tools.synth import MIXES, llama_config, parse_params, synth


def _digest(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_deterministic_by_seed(tmp_path):
    a = synth(tmp_path / "a.gguf", "4M", "Q4_0", seed=1)
    b = synth(tmp_path / "b.gguf", "4M", "Q4_0", seed=1)
    c = synth(tmp_path / "c.gguf", "4M", "Q4_0", seed=2)
    assert _digest(a.path) == _digest(b.path) != _digest(c.path)


def test_all_types_uses_every_supported_type(all_types_model):
    with lab.open_model(all_types_model) as m:
        used = {t.ggml_type for t in m.tensors}
    assert used == set(quant.TYPES), sorted(t.name for t in set(quant.TYPES) - used)


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_mixes_open_in_gguf_py_and_dequantize_finite(tmp_path, mix):
    r = synth(tmp_path / "m.gguf", "4M", mix, seed=0)
    reader = gguf.GGUFReader(r.path)
    assert len(reader.tensors) == r.n_tensors
    with lab.open_model(r.path) as m:
        assert m.check() == []
        for t in m.tensors:
            if quant.type_spec(t.ggml_type).kind == "int":
                continue
            for dtype in ("float32", "float16"):
                x = m.dequantize(t.name, dtype)
                assert np.isfinite(x).all(), (t.name, t.type_name, dtype)


def test_llama_names_and_shapes(small_model):
    with lab.open_model(small_model) as m:
        md = m.metadata
        e, ff, L = md["llama.embedding_length"], md["llama.feed_forward_length"], md["llama.block_count"]
        assert m.info("blk.0.attn_q.weight").shape == (e, e)
        assert m.info("blk.0.ffn_down.weight").shape == (ff, e)
        assert m.info(f"blk.{L - 1}.ffn_gate.weight").shape == (e, ff)
        assert m.info("output.weight").type_name == "Q6_K"
        assert m.info("blk.0.attn_norm.weight").type_name == "F32"


def test_q4_k_m_gives_more_bits_to_some_layers(tmp_path):
    r = synth(tmp_path / "m.gguf", "25M", "Q4_K_M")
    with lab.open_model(r.path) as m:
        v_types = {m.info(f"blk.{i}.attn_v.weight").type_name for i in range(m.metadata["llama.block_count"])}
    assert v_types == {"Q4_K", "Q6_K"}


@pytest.mark.parametrize("params,lo,hi", [("4M", 3e6, 6e6), ("25M", 22e6, 28e6), ("125M", 110e6, 140e6),
                                          ("7B", 6.5e9, 7e9), ("20B", 18e9, 22e9), ("70B", 65e9, 72e9)])
def test_config_sizes(params, lo, hi):
    cfg = llama_config(params)
    assert lo <= cfg.n_params <= hi
    assert cfg.n_embd % 256 == 0 and cfg.n_ff % 256 == 0  # k-quant rows
    assert cfg.n_layer >= 2


def test_bad_arguments(tmp_path):
    with pytest.raises(GGUFLabError, match="cannot read 'lots'"):
        parse_params("lots")
    with pytest.raises(GGUFLabError, match=r"^params \(--params\): '10K' is below the smallest"):
        parse_params("10K")
    with pytest.raises(GGUFLabError, match="unknown mix 'Q9'"):
        synth(tmp_path / "x.gguf", "4M", "Q9")
    assert not (tmp_path / "x.gguf").exists()


def test_interrupted_synth_leaves_no_file(tmp_path):
    def boom(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synth(tmp_path / "x.gguf", "4M", "Q4_0", progress=boom)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_interrupted_overwrite_keeps_the_old_file(tmp_path, threads):
    """synth --overwrite writes beside the old file and renames at the end: stopped midway,
    the old file is there as it was, and nothing else is."""
    old = synth(tmp_path / "x.gguf", "4M", "Q8_0", seed=1)
    before = open(old.path, "rb").read()

    def boom(done, total, name):
        if done > total // 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synth(tmp_path / "x.gguf", "4M", "Q4_0", seed=2, overwrite=True, progress=boom, threads=threads)
    assert os.listdir(tmp_path) == ["x.gguf"] and open(old.path, "rb").read() == before
    new = synth(tmp_path / "x.gguf", "4M", "Q4_0", seed=2, overwrite=True)
    assert os.listdir(tmp_path) == ["x.gguf"] and new.file_size == os.path.getsize(new.path)
    assert open(new.path, "rb").read() != before


def test_an_interrupt_before_any_byte_is_written_leaves_nothing(tmp_path, monkeypatch):
    from gguf_gpu_lab.tools import synth_archs as archs

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(archs, "add_metadata", boom)
    with pytest.raises(KeyboardInterrupt):
        synth(tmp_path / "x.gguf", "4M", "Q4_0")
    assert not os.listdir(tmp_path)


def test_overwrite_keeps_the_mode_and_writes_through_a_link(tmp_path):
    real = tmp_path / "store" / "x.gguf"
    real.parent.mkdir()
    synth(real, "4M", "Q8_0", seed=1)
    os.chmod(real, 0o600)
    link = tmp_path / "x.gguf"
    link.symlink_to(real)
    synth(link, "4M", "Q4_0", seed=2, overwrite=True)
    assert link.is_symlink() and os.stat(real).st_mode & 0o777 == 0o600
    with lab.open_model(link) as m:
        assert m.metadata["general.seed"] == 2
    os.chmod(real, 0o400)
    if not os.access(real, os.W_OK):  # (root writes anything)
        with pytest.raises(GGUFLabError, match="read-only; it is not replaced"):
            synth(link, "4M", "Q4_0", overwrite=True)


def test_what_a_killed_synth_left_is_named(tmp_path):
    left = tmp_path / ".x.gguf.partial-0123456789ab"
    left.write_bytes(b"\1" * 8192)
    with pytest.warns(UserWarning, match=r"x.gguf.partial-0123456789ab: left by an unfinished synth of .*x.gguf"):
        synth(tmp_path / "x.gguf", "4M", "Q4_0")
    assert sorted(os.listdir(tmp_path)) == [left.name, "x.gguf"]
    (tmp_path / ".y.gguf.partial-1").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (pytest -W error): the warning raises, before the path is claimed
        with pytest.raises(UserWarning):
            synth(tmp_path / "y.gguf", "4M", "Q4_0")
    assert "y.gguf" not in os.listdir(tmp_path)


def test_a_synth_killed_outright_leaves_only_its_partial(tmp_path):
    """SIGKILL mid-write: nothing at the model's path (no empty file that the next run would refuse
    as existing), the partial beside it, named by the next run, which writes the model."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys; from gguf_gpu_lab.tools.synth import synth\n"
            "synth(sys.argv[1], '25M', 'Q8_0', threads=1, progress=lambda d, t, n: __import__('time').sleep(0.05))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x.gguf")])
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(".x.gguf.partial-") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, "synth ended before it wrote"
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".x.gguf.partial-")
    with pytest.warns(UserWarning, match="left by an unfinished synth"):
        r = synth(tmp_path / "x.gguf", "4M", "Q4_0")
    assert r.file_size == os.path.getsize(tmp_path / "x.gguf") > 0


def test_a_file_appearing_during_a_synth_is_not_replaced(tmp_path):
    target = tmp_path / "x.gguf"

    def appear(done, total, name):
        if not target.exists():
            target.write_bytes(b"theirs")

    with pytest.raises(OutputExistsError, match="appeared there while the model was written; it was not replaced"):
        synth(target, "4M", "Q4_0", threads=1, progress=appear)
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["x.gguf"]


@pytest.mark.parametrize("params,mix,vocab", [("4M", "Q4_0", None), ("4M", "all-types", 3000), ("25M", "Q4_K_M", None)])
def test_file_bytes_is_the_size_from_above(tmp_path, params, mix, vocab):
    from gguf_gpu_lab.tools.synth import _plan, _tokens, file_bytes

    r = synth(tmp_path / "m.gguf", params, mix, vocab=vocab)
    need = file_bytes(_plan(r.config, mix), _tokens(r.config.vocab))
    assert r.file_size <= need <= r.file_size + 8192


def test_too_little_free_space_is_an_error_before_writing(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1_000_000))
    with pytest.raises(GGUFLabError, match=r"x.gguf: the model needs .* GB \(\d+ bytes\), .* has 0.00 GB free \(1000000 bytes\)"):
        synth(tmp_path / "x.gguf", "4M", "Q4_0")


# -- architectures (what transformers' GGUF loader reads is checked in test_hf.py) -------------

@pytest.mark.parametrize("arch", synth_archs.ARCHS)
def test_arch_files_use_gguf_py_names_and_finite_small_weights(tmp_path, arch):
    r = synth(tmp_path / "m.gguf", "1M", "Q4_K_M", arch=arch, heads=4, kv_heads=2, vocab=300, weights="small")
    gguf_arch = synth_archs.gguf_arch(arch)
    known = gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch)]
    allowed = {gguf.TENSOR_NAMES[t] for t in known}
    with lab.open_model(r.path) as m:
        assert m.metadata["general.architecture"] == gguf_arch
        assert (m.metadata["general.name"] == "mistral") == (arch == "mistral")
        assert m.metadata[f"{gguf_arch}.attention.head_count_kv"] == 2
        assert len(m.metadata_value("tokenizer.ggml.tokens")) == 300
        for t in m.tensors:
            base = t.name.rsplit(".", 1)[0]
            assert base.replace(f"blk.{t.layer}.", "blk.{bid}.") in allowed, t.name
            if len(t.shape) > 1:
                assert np.abs(m.dequantize(t.name)).max() < 0.5, t.name  # trained-model sized
        tied = "output.weight" not in m
    assert tied == (arch in ("qwen2", "qwen3", "gemma2", "gemma3"))


def test_arch_specifics(tmp_path):
    with lab.open_model(synth(tmp_path / "p.gguf", "1M", "Q8_0", arch="phi3", heads=4, kv_heads=2).path) as m:
        e, ff = m.metadata["phi3.embedding_length"], m.metadata["phi3.feed_forward_length"]
        assert m["blk.0.attn_qkv.weight"].np_shape == (e + 2 * e // 2, e)  # q, then k and v of 2 of 4 heads
        assert m["blk.0.ffn_up.weight"].np_shape == (2 * ff, e)  # gate and up in one tensor
    with lab.open_model(synth(tmp_path / "q.gguf", "1M", "Q8_0", arch="qwen2").path) as m:
        assert "blk.1.attn_k.bias" in m and m.metadata["tokenizer.ggml.model"] == "gpt2"
        merges = m.metadata_value("tokenizer.ggml.merges")
        tokens = set(m.metadata_value("tokenizer.ggml.tokens"))
        assert merges and all(a in tokens and b in tokens and a + b in tokens for a, b in (x.split(" ") for x in merges))
    with lab.open_model(synth(tmp_path / "g.gguf", "1M", "Q8_0", arch="gemma3").path) as m:
        assert m.metadata_value("tokenizer.ggml.tokens")[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
        assert m.metadata["gemma3.attention.key_length"] == m["blk.0.attn_q_norm.weight"].shape[0]


def test_default_llama_file_is_unchanged_by_the_arch_option(tmp_path):
    a = synth(tmp_path / "a.gguf", "4M", "Q4_0", seed=1)
    b = synth(tmp_path / "b.gguf", "4M", "Q4_0", seed=1, arch="llama", weights="random")
    assert _digest(a.path) == _digest(b.path)
    with lab.open_model(a.path) as m:  # the keys synth has always written, no more
        assert "llama.rope.freq_base" not in m.metadata and "tokenizer.ggml.bos_token_id" not in m.metadata


def test_arch_arguments_are_checked(tmp_path):
    with pytest.raises(GGUFLabError, match="unknown architecture 'bert'.*llama, mistral"):
        synth(tmp_path / "x.gguf", "1M", "Q8_0", arch="bert")
    with pytest.raises(GGUFLabError, match="must divide"):
        synth(tmp_path / "x.gguf", "1M", "Q8_0", heads=3)
    with pytest.raises(GGUFLabError, match="must divide"):
        synth(tmp_path / "x.gguf", "1M", "Q8_0", heads=4, kv_heads=3)
    with pytest.raises(GGUFLabError, match="--weights"):
        synth(tmp_path / "x.gguf", "1M", "Q8_0", weights="tiny")
    assert not (tmp_path / "x.gguf").exists()


def test_threads_write_the_same_bytes(tmp_path):
    a = synth(tmp_path / "a.gguf", "4M", "Q4_K_M", seed=5)
    b = synth(tmp_path / "b.gguf", "4M", "Q4_K_M", seed=5, threads=3)
    assert (a.n_tensors, a.n_params, a.file_size) == (b.n_tensors, b.n_params, b.file_size)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


@pytest.mark.parametrize("kw,line", [
    ({"params": "99999T"}, "params (--params): '99999T' is above the largest model synth writes (2T parameters)"),
    ({"seed": -1}, "seed must be a whole number from 0 to 4294967295, got -1"),
    ({"seed": 2**32}, "seed must be a whole number from 0 to 4294967295, got 4294967296"),
    ({"threads": 0}, "threads must be a whole number from 1 to 256, got 0"),
    ({"threads": 1.5}, "threads must be a whole number from 1 to 256, got 1.5"),
])
def test_numbers_out_of_range_are_refused_before_writing(tmp_path, kw, line):
    with pytest.raises(GGUFLabError) as e:
        synth(tmp_path / "x.gguf", **{"params": "1M", "mix": "Q8_0", **kw})
    assert str(e.value) == line and not list(tmp_path.iterdir())
