import os
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pandas as pd
import pytest

import gguf_gpu_lab as lab
from gguf_gpu_lab import GGUFFormatError, GGUFLabError

from .gguf_bytes import GGUFBytes, Tensor, f32_tensor, gstr


def test_open_model_attributes(small_model):
    with lab.open_model(small_model) as m:
        assert m.architecture == "llama"
        assert m.version == 3
        assert m.metadata["llama.block_count"] >= 2
        tok = m.metadata["tokenizer.ggml.tokens"]  # long arrays are summarised
        assert tok["length"] == 4096 and tok["head"][:2] == ["<tok0>", "<tok1>"]
        names = [t.name for t in m.tensors]
        assert names[0] == "token_embd.weight" and "output.weight" in names
        q = m.info("blk.1.attn_q.weight")
        assert q.layer == 1 and q.np_shape == tuple(reversed(q.shape))
        assert q.n_bytes == lab.type_spec(q.ggml_type).n_bytes(q.n_elements)
        assert m.info("token_embd.weight").layer is None
    assert m.closed


@pytest.mark.parametrize("what", [123, None, b"model.gguf", ["model.gguf"]])
def test_open_what_is_not_a_path(what):
    with pytest.raises(GGUFLabError, match=r"a model is opened from a path, a URL or a ByteSource, got "):
        lab.open_model(what)


def test_tensor_table_and_summary(small_model):
    with lab.open_model(small_model) as m:
        df = m.tensors_df()
        assert isinstance(df, pd.DataFrame) and len(df) == len(m.tensors)
        assert {"name", "type", "shape", "n_elements", "n_bytes", "offset", "group", "layer", "bits_per_weight"} <= set(df.columns)
        s = m.summary()
        assert s["tensor_bytes"] == df["n_bytes"].sum()
        assert s["file_size"] == os.path.getsize(small_model) > s["tensor_bytes"]
        assert set(s["by_type"].index) == {"Q4_K", "Q6_K", "F32"}
        assert s["by_layer"]["count"].sum() == len(df) and s["by_layer"]["n_bytes"].sum() == s["tensor_bytes"]
        emb = s["by_layer"].loc[("embeddings", -1)]
        assert emb["count"] == 1 and emb["n_bytes"] == m.info("token_embd.weight").n_bytes
        assert s["by_layer"].index[-1] == ("other", -1)  # output norm and output
        assert 4.5 < s["bits_per_weight"] < 6
        html = m._repr_html_()
        assert "Q4_K" in html and "llama" in html


def test_blocks_of_other_stacks_and_none(no_block_model, small_model):
    from gguf_gpu_lab.naming import block

    assert block("blk.12.ffn_up.weight") == ("blk", 12) and block("a.blk.0.x") == ("a.blk", 0)
    assert block("enc.blk.3.attn_k.weight") == ("enc.blk", 3) and block("blk.x.weight") is None
    with lab.open_model(no_block_model) as m:
        got = {t.name: (t.group, t.layer) for t in m.tensors}
        assert got == {"v.patch_embd.weight": (None, None), "v.blk.0.attn_q.weight": ("v.blk", 0),
                       "v.blk.1.attn_q.weight": ("v.blk", 1), "enc.blk.0.ffn_up.weight": ("enc.blk", 0),
                       "v.post_ln.weight": (None, None), "mm.0.weight": (None, None)}
        assert list(m.tensors_df()["group"]) == [g for g, _ in got.values()]
        by_layer = m.summary()["by_layer"]
        assert list(by_layer.index) == [("embeddings", -1), ("enc.blk", 0), ("v.blk", 0), ("v.blk", 1), ("other", -1)]
        assert list(by_layer["count"]) == [1, 1, 1, 1, 2]  # v.patch_embd; v.post_ln and mm.0
    with lab.open_model(small_model) as m:  # a plain decoder: one group
        by_layer = m.summary()["by_layer"]
        assert set(by_layer.index.get_level_values("group")) == {"embeddings", "blk", "other"}
        assert list(by_layer.loc["blk"].index) == list(range(m.metadata["llama.block_count"]))


def test_raw_is_zero_copy_and_matches_gguf_reader(small_model):
    r = gguf.GGUFReader(small_model)
    with lab.open_model(small_model) as m:
        for rt in r.tensors[:5]:
            raw = m.raw(rt.name)
            assert raw.dtype == np.uint8 and raw.base is not None  # a view, not a copy
            assert np.shares_memory(raw, m.source.view(0, m.file_size))
            assert bytes(raw) == bytes(rt.data.view(np.uint8).reshape(-1))


def test_dequantize_model_tensor(small_model):
    with lab.open_model(small_model) as m:
        t = m.info("blk.0.ffn_down.weight")
        x = m.dequantize(t.name)
        assert x.shape == t.np_shape and x.dtype == np.float32 and np.isfinite(x).all()
        assert m.dequantize(t.name, "float16").dtype == np.float16
        assert str(m.dequantize(t.name, "bfloat16").dtype) == "bfloat16"
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            m.dequantize("nope")


def test_closed_model_raises(small_model):
    m = lab.open_model(small_model)
    m.close()
    with pytest.raises(GGUFLabError, match="closed"):
        m.raw("output.weight")
    with pytest.raises(GGUFLabError, match="closed"):
        m.metadata_value("general.architecture")


def test_a_file_without_tensors_is_shown_and_inspected(tmp_path, capsys):
    """A vocabulary-only file (llama.cpp ships such ggml-vocab files): summary, the notebook's
    table, the model-bytes plot and ``inspect`` in every form work, with zero tensors."""
    import json

    from gguf_gpu_lab import cli

    g = GGUFBytes().add_str("general.architecture", "llama")
    p = g.write(tmp_path / "vocab.gguf")
    with lab.open_model(p) as m:
        s = m.summary()
        assert s["n_tensors"] == 0 and s["tensor_bytes"] == 0 and len(s["by_layer"]) == 0
        assert "0 tensors" in m._repr_html_() and len(m.tensors_df()) == 0
    for extra in ([], ["--json"], ["--tensors"], ["--json", "--tensors"]):
        assert cli.main(["inspect", p, *extra]) == 0, extra
        out = capsys.readouterr().out
        if "--json" in extra:
            assert json.loads(out)["n_tensors"] == 0, extra
        else:
            assert "vocab.gguf" in out, extra


def test_dequantize_and_check_never_read_the_mapping(small_model, monkeypatch):
    """A truncation under a read of the mapping ends the process (SIGBUS): the CPU's long reads,
    ``dequantize`` and ``check``, read copies instead."""
    from gguf_gpu_lab.source import LocalFile

    def no_mapping(self, offset, n):
        raise AssertionError("read through the mapping")

    with lab.open_model(small_model) as m:
        monkeypatch.setattr(LocalFile, "view", no_mapping)
        assert m.check() == [] and m.dequantize(m.tensors[0].name).size == m.tensors[0].n_elements


def test_dequantize_reads_a_copy(small_model, tmp_path, monkeypatch):
    """``dequantize`` works on a copy of the tensor's bytes, checked after its read: bytes
    written over the file while the values are computed do not reach them (it read the mapping,
    and 2 of 6 such races returned a mix of old and new values)."""
    import shutil

    from gguf_gpu_lab import model as model_module

    p = tmp_path / "m.gguf"
    shutil.copy(small_model, p)
    m = lab.open_model(p)
    t = max(m.tensors, key=lambda t: t.n_bytes)
    ref = m.dequantize(t.name)
    real = model_module.quant.dequantize

    def overwritten_meanwhile(raw, *a, **kw):
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\0" * t.n_bytes, t.offset)
        finally:
            os.close(fd)
        return real(raw, *a, **kw)

    monkeypatch.setattr(model_module.quant, "dequantize", overwritten_meanwhile)
    assert np.array_equal(m.dequantize(t.name), ref)
    with pytest.raises(lab.SourceChangedError):  # the next read sees the change
        m.dequantize(t.name)
    m.close()


# -- validation: each bad file raises GGUFFormatError naming file, tensor and value ----------

def _ok(**kw) -> GGUFBytes:
    g = GGUFBytes(**kw)
    g.add_str("general.architecture", "llama")
    g.tensors.append(f32_tensor("a", 8))
    return g


def _expect(tmp_path, g: GGUFBytes, *needles):
    p = g.write(tmp_path / "bad.gguf")
    with pytest.raises(GGUFFormatError) as e:
        lab.open_model(p)
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, GGUFLabError)
    return msg


def test_valid_handmade_file_opens(tmp_path):
    p = _ok().write(tmp_path / "ok.gguf")
    with lab.open_model(p) as m:
        assert m.dequantize("a").tolist() == [1.0] * 8


def test_bad_magic(tmp_path):
    _expect(tmp_path, _ok(magic=b"GGUX"), "magic")


@pytest.mark.parametrize("version", [1, 4, 0xFFFF])
def test_bad_version(tmp_path, version):
    _expect(tmp_path, _ok(version=version), f"version {version}")


def test_version_2_is_accepted(tmp_path):
    with lab.open_model(_ok(version=2).write(tmp_path / "v2.gguf")) as m:
        assert m.version == 2


def test_huge_tensor_count_fails_fast_without_allocating(tmp_path):
    p = tmp_path / "huge.gguf"
    p.write_bytes((b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0))[:20] + b"\0" * 4)  # 24 bytes, counts absurd
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(GGUFFormatError, match="tensor count 1152921504606846976"):
        lab.open_model(p)
    assert time.perf_counter() - t0 < 1.0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 << 20


def test_twenty_byte_file(tmp_path):
    p = tmp_path / "short.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQ", 3, 2**60))
    with pytest.raises(GGUFFormatError, match="too short"):
        lab.open_model(p)


def test_huge_kv_count(tmp_path):
    _expect(tmp_path, _ok(n_kv=2**40), "key-value count")


def test_alignment_not_power_of_two(tmp_path):
    _expect(tmp_path, _ok(alignment=48), "power of two")


def test_tensor_past_end_of_file(tmp_path):
    g = _ok()
    g.tensors.append(Tensor("big", (1 << 20,), 0, b"", offset=64))
    _expect(tmp_path, g, "'big'", "past the end")


def test_row_not_multiple_of_block(tmp_path):
    g = _ok()
    g.tensors.append(Tensor("q", (33, 2), 8, b"\0" * 34 * 3))  # Q8_0 row of 33
    _expect(tmp_path, g, "'q'", "33", "block size 32")


def test_shape_overflow(tmp_path):
    g = _ok()
    g.tensors.append(Tensor("ovf", (2**32, 2**32, 2**8), 0, b"\0" * 32))
    _expect(tmp_path, g, "'ovf'", "overflows")


@pytest.mark.parametrize("dims", [(0, 2**64 - 1), (0, 2**40, 2**40)])
def test_shape_of_no_elements_overflowing_is_refused(tmp_path, dims):
    """No elements, but dimensions NumPy cannot hold (it bounds the non-zero ones): refused at open,
    not a NumPy error at the load."""
    g = _ok()
    g.tensors.append(Tensor("z", dims, 0, b""))
    _expect(tmp_path, g, "'z'", "overflows", "non-zero dimensions")


def test_duplicate_names(tmp_path):
    g = _ok()
    g.tensors.append(f32_tensor("a", 8))
    _expect(tmp_path, g, "'a'", "duplicate")


def test_unknown_type_id(tmp_path):
    g = _ok()
    g.tensors.append(Tensor("weird", (32,), 99, b"\0" * 128))
    _expect(tmp_path, g, "'weird'", "type id 99")


def test_unsupported_type(tmp_path):
    g = _ok()
    g.tensors.append(Tensor("q81", (32,), 9, b"\0" * 40))  # Q8_1: gguf cannot dequantize it
    _expect(tmp_path, g, "'q81'", "Q8_1")


def test_misaligned_offset(tmp_path):
    g = _ok()
    g.tensors.append(Tensor("mis", (4,), 0, b"\0" * 16, offset=40))
    _expect(tmp_path, g, "'mis'", "offset 40")


def test_overlapping_tensors(tmp_path):
    g = GGUFBytes()
    g.tensors += [f32_tensor("a", 16, offset=0), f32_tensor("b", 16, offset=32)]
    _expect(tmp_path, g, "'b'", "overlaps", "'a'")


def test_overlap_hidden_by_an_empty_tensor_between(tmp_path):
    """a [0, 4096) and c [128, 1152) share bytes; a tensor of no bytes at 64 sorted between them
    is no reason to miss it (only neighbours were compared)."""
    g = GGUFBytes()
    g.tensors += [f32_tensor("a", 1024, offset=0), Tensor("b", (0,), 0, b"", offset=64),
                  f32_tensor("c", 256, offset=128)]
    _expect(tmp_path, g, "'c'", "overlaps", "'a'")


def test_too_many_dims(tmp_path):
    g = _ok()
    g.tensors.append(Tensor("five", (1, 1, 1, 1, 1), 0, b"\0" * 4))
    _expect(tmp_path, g, "'five'", "5 dimensions")


def test_truncated_metadata_is_wrapped(tmp_path):
    good = _ok().build()
    p = tmp_path / "trunc.gguf"
    p.write_bytes(good[:40])
    with pytest.raises(GGUFFormatError, match="truncated|fit"):
        lab.open_model(p)


def test_unknown_value_type_names_the_key(tmp_path):
    g = _ok()
    g.kv.append(gstr("bad.key") + struct.pack("<I", 77) + b"\0" * 8)
    _expect(tmp_path, g, "'bad.key'", "unknown value type 77")


def test_string_value_not_utf8_names_the_key(tmp_path):
    g = _ok()
    g.kv.append(gstr("bad.text") + struct.pack("<I", 8) + gstr(b"ok\xeb\xff"))
    _expect(tmp_path, g, "'bad.text'", "not UTF-8", "0xeb")


def test_key_not_utf8(tmp_path):
    g = _ok()
    g.kv.append(gstr(b"k\xff") + struct.pack("<II", 4, 1))
    _expect(tmp_path, g, "key 1", "not UTF-8")


def test_duplicate_key(tmp_path):
    g = _ok()
    g.add_str("general.architecture", "again")
    _expect(tmp_path, g, "duplicate key 'general.architecture'")


def test_big_endian_file_is_rejected_clearly(tmp_path):
    p = tmp_path / "be.gguf"
    p.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(GGUFFormatError, match="big-endian"):
        lab.open_model(p)


def test_every_truncation_of_a_real_file_is_handled(small_model, tmp_path):
    data = open(small_model, "rb").read()
    header_end = lab.open_model(small_model).data_offset
    cuts = sorted(set(list(range(0, 200, 7)) + list(range(200, header_end, max(1, header_end // 60))) + [header_end + 1, len(data) - 1]))
    p = tmp_path / "cut.gguf"
    for n in cuts:
        p.write_bytes(data[:n])
        with pytest.raises(GGUFFormatError):
            lab.open_model(p)


def test_missing_file():
    with pytest.raises(GGUFLabError, match="cannot open"):
        lab.open_model("/nonexistent/model.gguf")


# -- check() --------------------------------------------------------------------------------

def test_check_clean_model(all_types_model):
    with lab.open_model(all_types_model) as m:
        assert m.check() == []


def _plant(path, tensor, byte_offset, value_bytes):
    with lab.open_model(path) as m:
        off = m.info(tensor).offset + byte_offset
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(value_bytes)


def test_check_finds_nan_in_float_tensor_and_inf_in_scales(tmp_path, small_model):
    p = tmp_path / "planted.gguf"
    p.write_bytes(open(small_model, "rb").read())
    _plant(p, "blk.0.attn_norm.weight", 4 * 5, np.array([np.nan], np.float32).tobytes())
    _plant(p, "blk.1.attn_q.weight", 144 * 3 + 2, np.array([np.inf], np.float16).tobytes())  # Q4_K block 3, dmin
    with lab.open_model(p) as m:
        probs = m.check()
    assert [(x.tensor, x.block, x.where) for x in probs] == [
        ("blk.0.attn_norm.weight", 5, "value"), ("blk.1.attn_q.weight", 3, "scale@2")]
    assert "nan" in str(probs[0]) and "inf" in str(probs[1])


def test_check_iq1_m_packed_scale(tmp_path):
    from gguf_gpu_lab.scan import check_raw
    from gguf_gpu_lab.tools.synth import random_blocks

    b = random_blocks("IQ1_M", 4, np.random.Generator(np.random.SFC64(0)))
    assert check_raw("t", "IQ1_M", b) == []
    b[2, 55] |= 0x70  # scale bits 12-14 live in the top nibble of the last uint16 ...
    b[2, 53] |= 0xC0  # ... bits 10-11 in the top of the third: exponent all ones
    (p,) = check_raw("t", "IQ1_M", b)
    assert p.block == 2 and p.where.startswith("scale@48")


def test_raw_views_outlive_close(small_model):
    m = lab.open_model(small_model)
    raw = m.raw("output.weight")
    expected = bytes(raw[:64])
    m.close()
    assert m.closed
    assert bytes(raw[:64]) == expected  # still mapped: no crash, same bytes
    del raw


def test_public_face(small_model):
    assert callable(lab.load) and callable(lab.check) and callable(lab.open_model)
    assert {"load", "open_model", "check", "plots", "widgets", "tools", "LoadResult"} <= set(dir(lab))
    assert lab.plots.timeline is not None and lab.LoadResult.__doc__
    assert lab.check(small_model) == []
    with lab.open_model(small_model) as m:
        assert m["blk.0.attn_q.weight"] is m.info("blk.0.attn_q.weight")
        assert m.keys()[0] == "token_embd.weight" and len(m.keys()) == len(m)
        with pytest.raises(KeyError) as e:
            m["blk.0.attn_qq.weight"]
        assert isinstance(e.value, lab.TensorNotFoundError) and isinstance(e.value, GGUFLabError)
        assert "did you mean 'blk.0.attn_q.weight'" in str(e.value) and str(small_model) in str(e.value)


def test_missing_file_is_also_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lab.open_model(tmp_path / "nope.gguf")
    assert isinstance(e.value, GGUFLabError) and "nope.gguf" in str(e.value)
    with pytest.raises(FileNotFoundError):
        lab.load(tmp_path / "nope.gguf", backend="host")


def test_missing_names_are_gguflab_errors_and_key_errors_naming_the_file(small_model):
    from gguf_gpu_lab.loader import load

    with lab.open_model(small_model) as m:
        with pytest.raises(lab.MetadataNotFoundError) as e:
            m.metadata_value("general.architectur")
        assert isinstance(e.value, KeyError) and isinstance(e.value, lab.GGUFLabError)
        assert str(e.value).startswith(f"{small_model}: no metadata key 'general.architectur'; did you mean "
                                       "'general.architecture'")
    with pytest.raises(lab.TensorNotFoundError) as e:
        load(small_model, tensors=["nope", "blk.0.attn_q.weight", "nope2"], backend="host")
    assert str(e.value) == f"{small_model}: no tensor named 'nope' (and 1 more missing)"
    r = load(small_model, tensors=["blk.0.attn_q.weight"], backend="host")
    with pytest.raises(lab.TensorNotFoundError) as e:
        r["blk.0.attn_k.weight"]
    assert isinstance(e.value, KeyError) and str(e.value).startswith(f"{small_model}: no tensor loaded named "
                                                                    "'blk.0.attn_k.weight'; did you mean")
