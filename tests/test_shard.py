"""Shards: the pure plan (which bytes a shard reads, where they land) and ``load(shard=...)``: every
rank's shard of N in 2, 4, 8, loaded one after another and concatenated, bit-identical to the whole
load, for every type, in every mode (host backend here; the same on the GPU with -m gpu)."""

import numpy as np
import pytest

from gguf_gpu_lab import GGUFLabError, Shard, ShardError, open_model
from gguf_gpu_lab.loader import load
from gguf_gpu_lab.loader.plan import plan_chunks, shard_pieces
from gguf_gpu_lab.loader.shard import cut, resolve_cuts
from gguf_gpu_lab.model import TensorInfo
from gguf_gpu_lab.quant import type_spec


def _info(type_name="Q4_K", shape=(64, 512), offset=4096):
    spec = type_spec(type_name)
    n = int(np.prod(shape))
    return TensorInfo("w", spec.ggml_type, tuple(reversed(shape)), shape, n, spec.n_bytes(n), offset, 0)


def test_shard_checks_its_fields():
    assert Shard(np.int64(-1), 1, 2) == Shard(-1, 1, 2)
    for bad in [(0, 2, 2), (0, -1, 2), (0, 0, 0), (0.5, 0, 2), (True, 0, 2)]:
        with pytest.raises(ShardError):
            Shard(*bad)


def test_row_shard_is_one_range():
    t = _info("Q4_K", (64, 512))  # a row: 2 blocks of 144 bytes
    c = cut(t, (0, 1, 4))
    assert (c.outer, c.seg, c.start, c.aligned, c.contiguous) == (1, 16 * 512, 16 * 512, True, True)
    ps = shard_pieces(c, 1 << 20)
    assert len(ps) == 1 and ps[0].rows == 1 and ps[0].file_offset == t.offset + 16 * 2 * 144
    assert ps[0].nbytes == c.read_bytes == c.wanted_bytes == t.n_bytes // 4 and ps[0].out_block == 0
    assert c.np_shape == (16, 512) and c.region == (slice(16, 32), slice(0, 512))


def test_column_shard_is_one_segment_per_row_gathered_in_pieces():
    t = _info("Q8_0", (64, 512))  # a row: 16 blocks of 34 bytes; a half row: 8 blocks
    c = cut(t, Shard(-1, 1, 2))
    assert (c.outer, c.seg, c.first, c.cover, c.aligned, c.contiguous) == (64, 256, 8, 8, True, False)
    ps = shard_pieces(c, 20 * 8 * 34)  # 20 segments a piece
    assert [p.rows for p in ps] == [20, 20, 20, 4]
    assert all(p.stride == 16 * 34 and p.nbytes == p.rows * 8 * 34 for p in ps)
    assert [p.file_offset for p in ps] == [t.offset + r * 16 * 34 + 8 * 34 for r in (0, 20, 40, 60)]
    assert [p.out_block for p in ps] == [0, 160, 320, 480]
    # a segment bigger than a chunk: runs of its blocks, one row each
    small = shard_pieces(c, 3 * 34)
    assert all(p.rows == 1 and p.n_blocks <= 3 for p in small) and sum(p.n_blocks for p in small) == 64 * 8
    assert [p.out_block for p in small[:4]] == [0, 3, 6, 8]


def test_unaligned_column_shard_reads_covering_blocks_and_counts_them():
    t = _info("Q4_K", (8, 512))  # 256-weight blocks; a quarter row is 128 weights
    c = cut(t, (-1, 1, 4))
    assert (c.first, c.cover, c.head, c.aligned) == (0, 1, 128, False)
    assert c.read_bytes == 8 * 144 and c.wanted_bytes == 8 * 72
    chunks = plan_chunks([t], 1 << 20, {"w": c})
    assert len(chunks) == 1 and chunks[0].nbytes == c.read_bytes


def test_bad_shards_name_the_tensor_and_sizes():
    t = _info("Q8_0", (64, 96))
    with pytest.raises(ShardError, match=r"f\.gguf: tensor 'w': dimension -1 has size 96 .* 5 parts do not divide"):
        cut(t, (-1, 0, 5), "f.gguf")
    with pytest.raises(ShardError, match="dim 2 is not one"):
        cut(t, (2, 0, 2))
    with pytest.raises(ShardError, match="does not load"):
        resolve_cuts([t], {"nope": (0, 0, 2)}, "f.gguf")
    with pytest.raises(ShardError, match="mapping"):
        resolve_cuts([t], [(0, 0, 2)])


def test_bad_shard_fails_before_anything_is_read(small_model):
    with open_model(small_model) as m:
        with pytest.raises(ShardError, match="blk.0.attn_q.weight"):
            load(m, backend="host", shard={"blk.0.attn_q.weight": (0, 0, 3)})
        with pytest.raises(GGUFLabError, match="one device"):
            load(m, backend="host", device=[0, 1], shard={"blk.0.attn_q.weight": (0, 0, 2)})


def _two_d(t):
    return len(t.np_shape) == 2


def _check_concatenated(m, mode, dtype, chunk_mb=16.0, read="mmap", backend="host"):
    whole = load(m, mode=mode, dtype=dtype, backend=backend, chunk_mb=chunk_mb, read=read)
    for dim in (0, -1):
        for n in (2, 4, 8):
            parts = [load(m, mode=mode, dtype=dtype, backend=backend, chunk_mb=chunk_mb, read=read,
                          shard=lambda t: (dim, i, n) if _two_d(t) else None) for i in range(n)]
            for name, w in whole.items():
                if not _two_d(w.info):
                    assert np.array_equal(parts[-1][name].numpy().view(np.uint8), w.numpy().view(np.uint8)), name
                    continue
                got = [p[name] for p in parts]
                assert got[1].global_shape == w.info.np_shape and got[1].shard == Shard(dim, 1, n)
                cat = np.concatenate([g.numpy() for g in got], axis=dim)
                assert cat.shape == w.numpy().shape, (name, dim, n)
                assert np.array_equal(cat.view(np.uint8), w.numpy().view(np.uint8)), f"{mode} {dtype} {name} {dim} {n}"
                ref = w.numpy()[got[1].region]
                assert np.array_equal(got[1].numpy().view(np.uint8), ref.view(np.uint8))
            read_bytes = [p.file_bytes for p in parts]
            assert all(p.whole_bytes == whole.file_bytes for p in parts)
            assert sum(p.wanted_bytes for p in parts) >= whole.file_bytes  # replicated tensors counted N times
            assert all(r >= p.wanted_bytes for r, p in zip(read_bytes, parts))
            if dim == 0:
                assert read_bytes == [p.wanted_bytes for p in parts]
            assert parts[0].profile.meta["wanted_bytes"] == parts[0].wanted_bytes


CASES = [("gpu", "float16", 16.0), ("gpu", "float32", 0.02), ("gpu", "bfloat16", 16.0), ("cpu", "float32", 16.0),
         ("cpu", "bfloat16", 0.05), ("sequential", "float16", 16.0)]


@pytest.mark.parametrize("mode,dtype,chunk_mb", CASES, ids=lambda v: str(v))
def test_shards_concatenate_to_the_whole_load(all_types_model, mode, dtype, chunk_mb):
    with open_model(all_types_model) as m:
        _check_concatenated(m, mode, dtype, chunk_mb)


def test_shards_through_preadv(small_model):
    with open_model(small_model) as m:
        _check_concatenated(m, "gpu", "float16", 0.05, read="preadv")


def test_raw_shards_are_the_covering_blocks(all_types_model):
    with open_model(all_types_model) as m:
        for t in m.tensors:
            if not _two_d(t):
                continue
            whole = m.raw(t.name).reshape(t.np_shape[0], -1)
            rows = [load(m, mode="raw", backend="host", tensors=[t.name], shard={t.name: (0, i, 4)})[t.name].numpy()
                    for i in range(4)]
            assert np.array_equal(np.concatenate(rows), whole.reshape(-1)), t.name
            c = cut(t, (-1, 3, 4))
            got = load(m, mode="raw", backend="host", tensors=[t.name], shard={t.name: c.shard})[t.name].numpy()
            ts = type_spec(t.ggml_type).type_size
            assert np.array_equal(got, whole[:, c.first * ts:(c.first + c.cover) * ts].reshape(-1)), t.name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_shards_concatenate_on_the_gpu(all_types_model, mode, dtype):
    with open_model(all_types_model) as m:
        _check_concatenated(m, mode, dtype, 0.05, backend="cupy")
