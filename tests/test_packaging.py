"""The environment files and pyproject.toml agree on dependencies; no install lists two CuPy wheels."""

import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV_FILES = ["environment.yml", "environment-cuda.yml", "environment-rocm.yml"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _env_deps(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*-\s+(\S.*)$", line)
        if m and not m.group(1).startswith(("-e", "pip:")) and m.group(1) not in ("pip", "conda-forge"):
            names.add(_name(m.group(1)))
    return names


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_files_hold_every_dependency(pyproject):
    need = {_name(r) for r in pyproject["dependencies"]}
    need |= {_name(r) for extra in ("test", "notebook") for r in pyproject["optional-dependencies"][extra]
             if "python_version" not in r}  # back-ports the environments' Python 3.12 does not need
    for f in ENV_FILES:
        have = _env_deps(ROOT / f)
        assert need <= have, f"{f} lacks {sorted(need - have)}"


def test_environment_files_list_nothing_unknown(pyproject):
    known = {_name(r) for r in pyproject["dependencies"]}
    for extra in pyproject["optional-dependencies"].values():
        known |= {_name(r) for r in extra}
    known |= {"python", "cupy", "cuda-version"}  # conda-forge's names for the CUDA extra
    for f in ENV_FILES:
        extra = _env_deps(ROOT / f) - known
        assert not extra, f"{f} lists {sorted(extra)}, which pyproject.toml does not"


def test_one_cupy_per_install(pyproject):
    cupy = lambda names: {n for n in names if n.startswith("cupy")}  # noqa: E731
    for name, reqs in pyproject["optional-dependencies"].items():
        assert len(cupy(_name(r) for r in reqs)) <= 1, name
    assert not cupy(_name(r) for r in pyproject["dependencies"])
    for f in ENV_FILES:
        assert len(cupy(_env_deps(ROOT / f))) <= (0 if f == "environment.yml" else 1), f


def test_versions_agree(pyproject):
    pins = {_name(r): r for r in pyproject["dependencies"]}
    text = (ROOT / "environment.yml").read_text()
    assert "gguf" + pins["gguf"][len("gguf"):] in text


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = re.findall(r"```bash\n(.*?)```", readme, re.S)[0].strip().splitlines()
    setup, test = [c for c in cmds if not c.startswith("#")][:2]
    assert setup.strip() in ci and test.strip() in ci


def test_license_file_is_mit(pyproject):
    assert pyproject["license"] == "MIT" and "LICENSE" in pyproject["license-files"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_sdist_holds_what_its_tests_need(tmp_path):
    """pytest runs in an unpacked sdist: the tests with their conftests, helpers and data, and the
    files they read (notebooks, README, results, environment files, the CI script), and a LICENSE."""
    import subprocess
    import sys
    import tarfile

    import shutil

    # from a clean copy: an egg-info left by an earlier build would add its file list to this one
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", ".git", ".venv", "build",
                                                            "dist", "gguf-lab-*", ".pytest_cache"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=src, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    name = r.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        top = name[:-len(".tar.gz")]
        members = {m.name[len(top) + 1:] for m in tar.getmembers() if m.isfile()}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    want = {str(p.relative_to(ROOT)) for d in ("tests", "notebooks") for p in (ROOT / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts}
    want |= {"LICENSE", "README.md", "conftest.py", "pyproject.toml", ".ci/run", *ENV_FILES}
    want |= {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert {"tests/__init__.py", "tests/conftest.py", "tests/data/libgguf-grid-rows.npz", "tests/gguf_bytes.py"} <= want
    assert not want - members, sorted(want - members)[:10]
    assert "License-File: LICENSE" in pkg_info and not [m for m in members if m.endswith(".pyc")]


@pytest.fixture
def root_conftest(request):
    """The repository's conftest.py, as pytest loaded it."""
    want = ROOT / "conftest.py"
    mods = [p for p in request.config.pluginmanager.get_plugins()
            if Path(getattr(p, "__file__", "") or "").resolve() == want]
    assert len(mods) == 1, mods
    return mods[0]


@pytest.mark.parametrize("gpu, ci, cores, env, want", [
    (True, "true", 2, "", 0),    # a GPU: the GPU tests in one process
    (True, None, 16, "", 0),
    (False, "true", 2, "", 2),   # CI: 2 cores
    (False, "true", 64, "", 2),  # at most 2 under CI=true
    (False, "true", 1, "", 0),   # one core: no worker processes
    (False, None, 16, "", None),  # elsewhere xdist's own count
    (False, "true", 2, "5", None),  # PYTEST_XDIST_AUTO_NUM_WORKERS: xdist reads it
])
def test_how_many_test_processes(root_conftest, monkeypatch, gpu, ci, cores, env, want):
    monkeypatch.setattr(root_conftest, "_REASON", None if gpu else "no GPU here")
    monkeypatch.setattr(root_conftest, "_cores", lambda: cores)
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", env)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert root_conftest.pytest_xdist_auto_num_workers(None) == want


def test_the_test_command_runs_files_whole_in_parallel_processes():
    """loadfile keeps a file's tests in one process: module fixtures, thread and pinned-memory
    counts taken before and after within a file, a file's server ports."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.endswith("python -m pytest -n auto --dist loadfile"), ci
