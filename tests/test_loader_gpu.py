"""The loader on the GPU: every mode's output equals the CPU dequantization (run with -m gpu)."""

import numpy as np
import pytest

from gguf_gpu_lab import DeviceMemoryError, open_model
from gguf_gpu_lab.loader import load
from gguf_gpu_lab.verify import mismatches

pytestmark = pytest.mark.gpu


def _check_all(m, r, mode, dtype):
    for t in m.tensors:
        got = r[t.name]
        if mode == "raw":
            assert np.array_equal(got.numpy().reshape(-1), m.raw(t.name)), t.name
            continue
        exp = m.dequantize(t.name, dtype)
        bad = mismatches(got.numpy().reshape(-1), exp.reshape(-1))
        assert bad.size == 0, f"{mode} {dtype} {t.name} ({t.type_name}): {bad.size} values differ"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["gpu", "raw", "cpu", "sequential"])
def test_modes_match_cpu_dequantization_all_types(all_types_model, mode, dtype):
    with open_model(all_types_model) as m:
        r = load(m, mode=mode, dtype=dtype, chunk_mb=0.25, streams=4, readers=3, backend="cupy")
        assert r.backend == "cupy" and len(r) == len(m.tensors)
        _check_all(m, r, mode, dtype)


@pytest.mark.parametrize("order", ["file", "largest", "layer"])
def test_q4_k_m_model_gpu_mode(small_model, order):
    with open_model(small_model) as m:
        r = load(m, mode="gpu", dtype="float32", chunk_mb=0.1, order=order, backend="cupy")
        _check_all(m, r, "gpu", "float32")
        spans = r.profile.df
        assert set(spans["stage"]) >= {"read", "h2d", "dequant"}
        assert spans["lane"].str.startswith("stream").any()


def test_to_torch_is_zero_copy(small_model):
    torch = pytest.importorskip("torch")
    with open_model(small_model) as m:
        r = load(m, mode="gpu", dtype="bfloat16", backend="cupy", tensors=["blk.0.attn_q.weight"])
        dt = r["blk.0.attn_q.weight"]
        t = dt.to_torch()
        assert t.dtype == torch.bfloat16 and t.data_ptr() == dt.array.data.ptr and t.is_cuda
        ref = torch.from_numpy(m.dequantize("blk.0.attn_q.weight")).bfloat16()
        assert torch.equal(t.cpu(), ref)


def test_lazy_tensor_and_cache_on_gpu(small_model):
    with open_model(small_model) as m:
        a = m.tensor("output.weight", backend="cupy")
        b = m.tensor("output.weight", backend="cupy")
        assert a is b and m.cache_info()["loads"] == 1
        assert np.array_equal(a.numpy().reshape(-1), m.dequantize("output.weight", "float16").reshape(-1))


def test_out_of_memory_raises_and_cleans_up(small_model):
    import cupy

    pool = cupy.get_default_memory_pool()
    limit = pool.get_limit()
    try:
        pool.set_limit(size=1 << 20)
        with open_model(small_model) as m:
            with pytest.raises(DeviceMemoryError, match="bytes"):
                load(m, mode="gpu", dtype="float32", backend="cupy")
    finally:
        pool.set_limit(size=limit)
    with open_model(small_model) as m:  # and the next load works
        r = load(m, mode="gpu", backend="cupy", tensors=["output.weight"])
        assert r["output.weight"].array.shape == m.info("output.weight").np_shape
