import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.Generator(np.random.SFC64(1234))


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A small synthetic Q4_K_M model shared by read-only tests."""
    from gguf_gpu_lab.tools.synth import synth

    path = tmp_path_factory.mktemp("models") / "small-q4km.gguf"
    synth(path, "4M", "Q4_K_M", seed=7)
    return path


@pytest.fixture(scope="session")
def all_types_model(tmp_path_factory):
    from gguf_gpu_lab.tools.synth import synth

    path = tmp_path_factory.mktemp("models") / "all-types.gguf"
    synth(path, "4M", "all-types", seed=3)
    return path


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    """A llama of another size and quant mix than the notebooks' built-in model."""
    from gguf_gpu_lab.tools.synth import synth

    path = tmp_path_factory.mktemp("models") / "other-q4_0.gguf"
    synth(path, "4M", "Q4_0", seed=11)
    return path


NO_BLOCK_TENSORS = [  # a vision tower and projector (mmproj), an encoder's block, loose tensors
    ("v.patch_embd.weight", "F16", (8, 3, 4, 4)), ("v.blk.0.attn_q.weight", "Q8_0", (64, 64)),
    ("v.blk.1.attn_q.weight", "Q4_K", (64, 256)), ("enc.blk.0.ffn_up.weight", "Q8_0", (32, 64)),
    ("v.post_ln.weight", "F32", (100,)), ("mm.0.weight", "F32", (16, 64))]


@pytest.fixture(scope="session")
def no_block_model(tmp_path_factory):
    """A file without a single decoder ``blk.N.`` tensor: ``NO_BLOCK_TENSORS``, in that order."""
    import gguf

    from gguf_gpu_lab.tools.synth import random_blocks

    rng = np.random.Generator(np.random.SFC64(5))
    path = tmp_path_factory.mktemp("models") / "no-blocks.gguf"
    w = gguf.GGUFWriter(str(path), "clip")
    for name, type_name, shape in NO_BLOCK_TENSORS:
        t = gguf.GGMLQuantizationType[type_name]
        if type_name in ("F32", "F16"):
            w.add_tensor(name, rng.standard_normal(shape).astype(type_name.replace("F", "float")))
        else:
            n_blocks = int(np.prod(shape)) // gguf.GGML_QUANT_SIZES[t][0]
            w.add_tensor(name, random_blocks(t, n_blocks, rng).reshape(shape[0], -1), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
