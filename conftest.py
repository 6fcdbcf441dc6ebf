"""pytest set-up for the tests and for the docstring examples of the package (collected through
``--doctest-modules``): markers, GPU tests skipped with a reason where no GPU is found, and the
model the examples use."""

import os
import re
import shutil

import pytest
from _pytest.doctest import DoctestItem


# opening a model on a GPU machine starts a warm-up that pins a staging ring in the background: a
# test that counts pinned or device memory must not race one. Off for the suite (and the kernels
# and processes it starts); tests/test_warmup.py turns it on where it tests it.
os.environ.setdefault("GGUF_LAB_WARMUP", "0")


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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where xdist is not installed
def pytest_xdist_auto_num_workers(config):
    """How many processes ``-n auto`` (pytest-xdist, the README's test command) starts: none where
    a GPU is found (the GPU tests count device memory, pinned memory and threads, and time loads:
    two processes on one device would see each other), at most 2 under CI=true (CI's machine has
    2 cores, and more workers than cores only add start-up), none with a single core; elsewhere
    xdist's own count. PYTEST_XDIST_AUTO_NUM_WORKERS still overrides all of it."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    if _REASON is None:
        return 0
    if _cores() < 2:
        return 0
    if os.environ.get("CI") == "true":
        return 2
    return None


@pytest.hookimpl(tryfirst=True)  # marks added before -m selects by them
def pytest_collection_modifyitems(config, items):
    for item in items:  # a docstring example that uses CuPy is a GPU test
        if isinstance(item, DoctestItem) and any(re.search(r"\bcupy\b", e.source) for e in item.dtest.examples):
            item.add_marker(pytest.mark.gpu)
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=f"no GPU: {_REASON}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _example_model(tmp_path_factory):
    from gguf_gpu_lab.tools.synth import synth

    path = tmp_path_factory.mktemp("examples") / "model.gguf"
    synth(path, "1M", "Q4_K_M", seed=0)
    return path


@pytest.fixture(autouse=True)
def _docstring_examples(request):
    """Each docstring example runs in a fresh folder holding ``model.gguf`` (a small synthetic
    llama), with that model open as ``model`` and the folder as ``tmp_path``."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    if request.node.name.startswith("gguf_gpu_lab.widgets."):
        pytest.importorskip("ipywidgets", reason="the dashboards need ipywidgets (the test and notebook extras)")
    if request.node.name.startswith(("gguf_gpu_lab.hf", "gguf_gpu_lab.export.")):  # hf, hf_tokenizer, ...
        from tests.needs import require

        require("torch", "transformers")  # the hf extra: skipped without it (failed under CI=true)
    from gguf_gpu_lab import open_model

    tmp_path = request.getfixturevalue("tmp_path")
    shutil.copy(request.getfixturevalue("_example_model"), tmp_path / "model.gguf")
    request.getfixturevalue("monkeypatch").chdir(tmp_path)
    namespace = request.getfixturevalue("doctest_namespace")
    with open_model("model.gguf") as model:
        namespace.update(model=model, tmp_path=tmp_path)
        yield
    for name in ("model", "tmp_path"):
        del namespace[name]
