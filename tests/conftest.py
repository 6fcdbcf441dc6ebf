import numpy as np
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU through CuPy; skipped with a reason where none is found")
    config.addinivalue_line("markers", "slow: long-running; sampled versions run in CI")


def _gpu_reason() -> str | None:
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA/ROCm install
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy finds no usable GPU ({type(e).__name__}: {e})"
    return None if n > 0 else "CuPy reports 0 GPUs"


_REASON = _gpu_reason()


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=f"no GPU: {_REASON}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.Generator(np.random.SFC64(1234))


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A small synthetic Q4_K_M model shared by read-only tests."""
    from gguf_gpu_lab.synth import synth

    path = tmp_path_factory.mktemp("models") / "small-q4km.gguf"
    synth(path, "4M", "Q4_K_M", seed=7)
    return path


@pytest.fixture(scope="session")
def all_types_model(tmp_path_factory):
    from gguf_gpu_lab.synth import synth

    path = tmp_path_factory.mktemp("models") / "all-types.gguf"
    synth(path, "4M", "all-types", seed=3)
    return path
