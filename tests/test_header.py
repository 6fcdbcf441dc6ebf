"""The header parser against gguf-py's GGUFReader (the oracle): every key, value type and tensor."""

import struct

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as VT

import gguf_gpu_lab as lab
from gguf_gpu_lab import GGUFFormatError, header

from .gguf_bytes import GGUFBytes, f32_tensor, gstr

_CODES = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
          VT.FLOAT32: "f", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d", VT.BOOL: "?"}


def encode(vtype: VT, value) -> bytes:
    """A value's bytes (without its type), as GGUF stores it."""
    if vtype == VT.STRING:
        return gstr(value)
    if vtype == VT.ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(encode(etype, x) for x in items)
    return struct.pack("<" + _CODES[vtype], value)


def kv(key: str | bytes, vtype: VT, value) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + encode(vtype, value)


def flat(v):
    """Leaf values in order: GGUFReader's contents() flattens arrays of arrays."""
    if isinstance(v, list):
        return [x for item in v for x in flat(item)]
    return [v]


def assert_same_as_reader(path):
    """Opens ``path`` with both parsers, checks they agree, and returns the open model."""
    r = gguf.GGUFReader(path)
    m = lab.open_model(path)
    h = m._header
    reader_fields = [(k, f) for k, f in r.fields.items() if not k.startswith("GGUF.")]
    assert list(h.fields) == [k for k, _ in reader_fields]
    for k, rf in reader_fields:
        f = h.fields[k]
        assert f.type == rf.types[0], k
        assert f.offset == rf.offset, k
        mine = f.value()
        if f.is_array:
            assert f.length == int(rf.parts[4][0]), k  # the count field
            assert flat(mine) == rf.contents(), k
            for n in (0, 1, 3):
                assert flat(f.head(n)) == flat(mine[:n]), k
        else:
            assert mine == rf.contents(), k
            assert type(mine) is type(rf.contents()), k
    assert h.alignment == r.alignment and m.data_offset == r.data_offset
    assert [(t.name, t.ggml_type, t.shape, t.n_elements, t.n_bytes, t.offset) for t in m.tensors] == [
        (t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.n_elements, t.n_bytes, t.data_offset)
        for t in r.tensors]
    for t, rt in zip(h.tensors, r.tensors):
        assert t.info_offset == rt.field.offset
    return m


EVERY_TYPE = [
    kv("u8", VT.UINT8, 255), kv("i8", VT.INT8, -128), kv("u16", VT.UINT16, 65535), kv("i16", VT.INT16, -32768),
    kv("u32", VT.UINT32, 2**32 - 1), kv("i32", VT.INT32, -2**31), kv("f32", VT.FLOAT32, 0.1),
    kv("u64", VT.UINT64, 2**64 - 1), kv("i64", VT.INT64, -2**63), kv("f64", VT.FLOAT64, -1e300),
    kv("bool.t", VT.BOOL, True), kv("bool.f", VT.BOOL, False),
    kv("str", VT.STRING, "hello"), kv("str.empty", VT.STRING, ""), kv("str.unicode", VT.STRING, "héllo 中文 😀"),
    kv("ключ.ユニコード", VT.STRING, "a unicode key"), kv("", VT.UINT8, 1),
    kv("arr.empty", VT.ARRAY, (VT.INT32, [])), kv("arr.empty_str", VT.ARRAY, (VT.STRING, [])),
    kv("arr.f32", VT.ARRAY, (VT.FLOAT32, [0.5, -1.25, 3e38])), kv("arr.bool", VT.ARRAY, (VT.BOOL, [True, False, True])),
    kv("arr.u64.long", VT.ARRAY, (VT.UINT64, list(range(0, 2**40, 2**33)))),
    kv("arr.str", VT.ARRAY, (VT.STRING, ["a", "", "中文", "x" * 300, "tail"])),
    kv("arr.nested", VT.ARRAY, (VT.ARRAY, [(VT.INT16, [1, -2]), (VT.INT16, []), (VT.INT16, [3])])),
    kv("arr.nested.str", VT.ARRAY, (VT.ARRAY, [(VT.STRING, ["p", "q"]), (VT.STRING, ["r"])])),
]


@pytest.mark.parametrize("version", [2, 3])
def test_every_value_type_equals_gguf_reader(tmp_path, version):
    g = GGUFBytes(version=version)
    g.kv += EVERY_TYPE
    g.tensors += [f32_tensor("a", 8), f32_tensor("b.weight", 16)]
    m = assert_same_as_reader(g.write(tmp_path / f"v{version}.gguf"))
    assert m.version == version
    md = m.metadata
    assert md["arr.u64.long"]["length"] == 128 and md["arr.u64.long"]["head"] == [0, 2**33, 2**34, 3 * 2**33]
    assert md["arr.str"] == ["a", "", "中文", "x" * 300, "tail"]
    assert md["arr.nested"] == [[1, -2], [], [3]]
    assert md["ключ.ユニコード"] == "a unicode key"


def test_random_metadata_equals_gguf_reader(tmp_path):
    rng = np.random.Generator(np.random.SFC64(5))
    scalar_types = list(_CODES)

    def value(t, depth=0):
        if t == VT.STRING:
            n = int(rng.choice([0, 1, 5, 255, 256, 70000]))
            return "".join(rng.choice(list("ab中😀\0 ")) for _ in range(n))
        if t == VT.ARRAY:
            et = VT(int(rng.choice([*scalar_types, VT.STRING] + ([VT.ARRAY] if depth < 2 else []))))
            return et, [value(et, depth + 1) for _ in range(int(rng.integers(0, 6)))]
        info = np.iinfo(np.dtype("<" + _CODES[t])) if t not in (VT.FLOAT32, VT.FLOAT64, VT.BOOL) else None
        if t == VT.BOOL:
            return bool(rng.integers(2))
        if info is None:
            return float(np.float32(rng.standard_normal())) if t == VT.FLOAT32 else float(rng.standard_normal())
        return int(rng.integers(info.min, info.max, endpoint=True, dtype=np.dtype("<" + _CODES[t])))

    for i in range(12):
        g = GGUFBytes(version=int(rng.choice([2, 3])))
        for j in range(int(rng.integers(1, 12))):
            t = VT(int(rng.choice([*scalar_types, VT.STRING, VT.ARRAY])))
            g.kv.append(kv(f"key.{j}", t, value(t)))
        g.tensors.append(f32_tensor("t", 8))
        assert_same_as_reader(g.write(tmp_path / f"r{i}.gguf"))


@pytest.mark.parametrize("window", [64, 300, 1 << 20])
def test_string_scan_over_hard_vocabularies(tmp_path, monkeypatch, window):
    """Empty strings, long ones, zero bytes inside, and window edges: the vectorised scan must
    find exactly the strings GGUFReader finds."""
    monkeypatch.setattr(header, "_SCAN_WINDOW", window)
    rng = np.random.Generator(np.random.SFC64(9))
    tokens = []
    for i in range(3000):
        kind = i % 11
        if kind == 0:
            tokens.append("")
        elif kind == 1:
            tokens.append("\0" * int(rng.integers(1, 20)))
        elif kind == 2:
            tokens.append("y" * int(rng.integers(256, 700)))
        elif kind == 3:
            tokens.append("z\0\0\0\0\0\0\0\0z")
        else:
            tokens.append(f"▁tok{i}")
    tokens += ["w" * 70000] + [f"t{i}" for i in range(500)] + [""] * 40
    g = GGUFBytes()
    g.kv.append(kv("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, tokens)))
    g.kv.append(kv("after", VT.UINT32, 7))
    g.tensors.append(f32_tensor("t", 8))
    m = assert_same_as_reader(g.write(tmp_path / "hard.gguf"))
    assert m.metadata_value("tokenizer.ggml.tokens") == tokens
    assert m.metadata["after"] == 7


def test_vocabulary_of_synth_equals_reader_and_numeric_arrays_are_copies(tmp_path):
    from gguf_gpu_lab.tools.synth import synth

    r = synth(tmp_path / "v.gguf", "4M", "Q4_0", vocab=20000)
    m = assert_same_as_reader(r.path)
    tokens = m.metadata_value("tokenizer.ggml.tokens")
    assert len(tokens) == 20000 and tokens[:2] == ["<tok0>", "<tok1>"] and "中文" in "".join(tokens[256:270])
    scores = m.metadata_value("tokenizer.ggml.scores")
    assert scores.dtype == np.float32 and len(scores) == 20000
    assert not np.shares_memory(scores, m.source.view(0, m.file_size)) and not scores.flags.writeable
    types = m.metadata_value("tokenizer.ggml.token_type")
    assert types.dtype == np.int32 and types[:4].tolist() == [3, 3, 3, 1]
    with pytest.raises(KeyError, match="no metadata key 'nope'"):
        m.metadata_value("nope")


def test_invalid_utf8_token_is_named_on_access(tmp_path):
    g = GGUFBytes()
    g.kv.append(gstr("tok") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 3) + gstr("a") + gstr(b"\xff\xfe") + gstr("c"))
    g.tensors.append(f32_tensor("t", 8))
    with lab.open_model(g.write(tmp_path / "u.gguf")) as m:
        with pytest.raises(GGUFFormatError, match=r"key 'tok'\[1\] at offset \d+ is not UTF-8"):
            m.metadata_value("tok")
        # the summary (repr, inspect, the notebook's table) shows it replaced, and the rest of the file
        assert m.metadata["tok"] == ["a", "\ufffd\ufffd", "c"] and m.architecture is None
        assert "1 tensors" in repr(m) and m.summary()["n_tensors"] == 1


def test_a_long_array_with_a_broken_string_in_its_head_is_shown(tmp_path):
    """A vocabulary whose first tokens hold a string that is not UTF-8 (its summary decodes the
    first four) keeps the model displayable; the whole value names the string."""
    g = GGUFBytes().add_str("general.architecture", "llama")
    n = 40
    g.kv.append(gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, n) + gstr(b"\xe4\xb8")
                + b"".join(gstr(f"t{i}") for i in range(1, n)))
    g.tensors.append(f32_tensor("t", 8))
    with lab.open_model(g.write(tmp_path / "v.gguf")) as m:
        assert m.metadata["tokenizer.ggml.tokens"]["head"] == ["\ufffd", "t1", "t2", "t3"]
        assert m.architecture == "llama" and "llama" in repr(m) and "<table>" in m._repr_html_()
        with pytest.raises(GGUFFormatError, match=r"\[0\] at offset \d+ is not UTF-8"):
            m.metadata_value("tokenizer.ggml.tokens")


@pytest.mark.parametrize("blob, needle", [
    (gstr("k") + struct.pack("<IIQ", VT.ARRAY, VT.UINT32, 2**61), "cannot fit"),
    (gstr("k") + struct.pack("<IIQ", VT.ARRAY, 99, 1), "unknown value type 99"),
    (gstr("k") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2) + gstr("a") + struct.pack("<Q", 2**62), "claims"),
    (gstr("k") + struct.pack("<IQ", VT.STRING, 100) + b"ab", "truncated"),
    (gstr("k") + struct.pack("<I", VT.ARRAY) + struct.pack("<IQ", VT.ARRAY, 1) * 12, "nested deeper"),
    (gstr("general.alignment") + struct.pack("<IQ", VT.UINT64, 64), "must be a UINT32"),
], ids=["count", "element-type", "string-length", "string-value", "nesting", "alignment-type"])
def test_bad_arrays_name_the_key(tmp_path, blob, needle):
    g = GGUFBytes()
    g.kv.append(blob)  # last in the file: a short array runs into its end
    p = g.write(tmp_path / "bad.gguf")
    with pytest.raises(GGUFFormatError, match=needle) as e:
        lab.open_model(p)
    assert str(p) in str(e.value) and ("'k'" in str(e.value) or "alignment" in str(e.value))


def test_strings_decoded_at_once_equal_one_by_one():
    """``_decode_strings`` (one decode of the joined strings) gives each string's own decode, or
    None where one string alone is not UTF-8, even when the joined bytes are (a character cut in two)."""
    from gguf_gpu_lab.header import _decode_strings

    def encoded(pieces, gap=0):
        blob, starts = b"\x07" * 3, []
        for p in pieces:
            blob += struct.pack("<Q", len(p)) + b"\x05" * gap
            starts.append(len(blob))
            blob += p
        return _decode_strings(blob, np.array(starts, np.int64), np.array([len(p) for p in pieces], np.int64))

    cases = [["a", "", "\u00e9t\u00e9", "\u4e2d\U0001f600", "x" * 300], ["", ""], ["x"], [""], ["a\0b", "\0", "c"]]
    for gap in (0, 2):  # back to back (one array) and apart
        for texts in cases:
            assert encoded([t.encode() for t in texts], gap) == texts, (gap, texts)
        assert encoded([b"a\xc3", b"\xa9b"], gap) is None  # "\u00e9" cut between two strings
        assert encoded([b"ok", b"\xff"], gap) is None
        assert encoded([b"ok", "\ud800".encode("utf-8", "surrogatepass")], gap) is None
    assert encoded([]) == []
