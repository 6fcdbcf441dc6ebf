"""The compile gate: ``dequant.cu`` built for AMD GPUs with hipcc and for NVIDIA GPUs with nvcc,
with exactly the options the toolkit passes to hipRTC and NVRTC at run time
(``quant.gpu.kernel_options``), for every kernel variant ``launch`` can pick
(``quant.gpu.all_variants``), device code only. No GPU is needed. A kernel change that breaks
either compiler, or makes it warn, fails here; where a compiler is missing the test skips with
the reason, except under CI=true, where a missing hipcc fails (.ci/run installs it)."""

import os
import re
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from gguf_gpu_lab.quant.gpu import KERNEL_SOURCE, all_variants, kernel_options

# CDNA2 (MI200), CDNA3 (MI300), RDNA3 (RX 7900: wave32); Ampere (A100) and Hopper (H100, H200)
AMD_TARGETS = ("gfx90a", "gfx942", "gfx1100")
NVIDIA_TARGETS = ("sm_80", "sm_90")
JOBS = max(2, os.cpu_count() or 1)
# hipcc adds host link flags that a device-only compile leaves unused; nothing else is filtered
HIPCC_BASE = ("--cuda-device-only", "-x", "hip", "-Wno-unused-command-line-argument")
HIP_ENV = {**os.environ, "HIP_PLATFORM": "amd"}  # this machine may have nvcc too: hipcc would target it
HOW_TO_GET = {"hipcc": "Debian: apt-get install -y hipcc",
              "nvcc": "a CUDA toolkit; Debian has one only in non-free, which CI's package sources lack"}


def _compiler(name: str, ci_must_have: bool) -> str:
    exe = shutil.which(name)
    if exe is None:
        why = f"{name} is not installed"
        if ci_must_have and os.environ.get("CI") == "true":
            pytest.fail(f"{why}, and CI=true: the compile gate must run in CI (.ci/run installs it)")
        pytest.skip(f"{why} ({HOW_TO_GET[name]})")
    return exe


def _run(cmd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _problems(results) -> list[str]:
    """'variant: message' for every failed compile and every warning, errors first."""
    out = []
    for v, r in results:
        text = (r.stdout + r.stderr).strip()
        if r.returncode:
            out.insert(0, f"{v}: exit {r.returncode}\n{text[-3000:]}")
        elif re.search(r"warning", text, re.I):
            out.append(f"{v}: warns\n{text[-3000:]}")
    return out


def _compile_all(make_cmd, variants, env=None):
    with ThreadPoolExecutor(JOBS) as pool:
        return list(zip(variants, pool.map(lambda v: _run(make_cmd(v), env), variants)))


# -- AMD: hipcc ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hipcc():
    return _compiler("hipcc", ci_must_have=True)


def _clang_behind_hipcc(r: subprocess.CompletedProcess, args: list[str], target: str) -> list[str] | None:
    """The clang command (without ``args``) that hipcc ran, from the ``hipcc-cmd:`` line that
    HIPCC_VERBOSE=1 prints: hipcc's own flags (include paths, -O3, the device library path, the
    -mllvm options) with ``--offload-arch`` moved among them. Debian's hipcc is a Perl script that
    runs clang twice more (``--version``, ``-print-target-triple``) on every call, about 0.3 s of
    CPU a compile; the gate's hundreds of compiles call clang directly. None where the line is
    missing or does not end with ``args`` (another hipcc): the gate then goes through hipcc."""
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("hipcc-cmd:")]
    if len(lines) != 1:
        return None
    cmd = shlex.split(lines[0][len("hipcc-cmd:"):])
    rest = [a for a in args if a != f"--offload-arch={target}"]
    if len(cmd) <= len(rest) or cmd[len(cmd) - len(rest):] != rest or f"--offload-arch={target}" not in cmd:
        return None
    return cmd[:len(cmd) - len(rest)]


@pytest.fixture(scope="module")
def hip_headers(tmp_path_factory):
    """hipRTC declares HIP's device API without an include; hipcc needs ``hip/hip_runtime.h``.
    Parsed once per target into a precompiled header, which halves every compile after it."""
    d = tmp_path_factory.mktemp("hip")
    (d / "hip_rtc.h").write_text("#include <hip/hip_runtime.h>\n")
    return d


@pytest.fixture(scope="module", params=AMD_TARGETS, ids=lambda t: f"hipcc-{t}")
def amd_target(request, hipcc, hip_headers):
    """(target, extra flags, precompiled header, note, the clang command hipcc runs for it, or
    None). A target the compiler does not know skips; one it knows without a device library (ROCm
    5.2 has none for gfx1100) compiles to assembly with ``-nogpulib``, unlinked: every kernel
    through the gfx1100 back end."""
    target = request.param
    contraction = [o for o in kernel_options(*all_variants()[0], hip=True) if not o.startswith("-D")]
    pch = hip_headers / f"{target}.pch"

    def build(extra):
        args = [*HIPCC_BASE, f"--offload-arch={target}", *extra, *contraction, "-c", "-fsyntax-only",
                "-Xclang", "-emit-pch", "-Xclang", "-o", "-Xclang", str(pch), str(hip_headers / "hip_rtc.h")]
        r = _run([hipcc, *args], {**HIP_ENV, "HIPCC_VERBOSE": "1"})
        return r, _clang_behind_hipcc(r, args, target)

    r, clang = build([])
    if r.returncode and "cannot find ROCm device library" in r.stderr:
        note = f"{target}: this ROCm has no device library for it: compiled to assembly, not linked"
        print(note)
        r2, clang = build(["-nogpulib"])
        if r2.returncode == 0:
            return target, ["-nogpulib", "-S"], pch, note, clang
    if r.returncode and re.search(r"invalid target ID|unknown target|not a recognized processor", r.stderr):
        first = r.stderr.strip().splitlines()[0]
        pytest.skip(f"hipcc does not know {target}: {first}")
    assert r.returncode == 0, f"hip_runtime.h does not build for {target}:\n{r.stderr[-3000:]}"
    return target, [], pch, "", clang


def test_hipcc_compiles_every_variant(amd_target, hipcc, tmp_path):
    """Every variant, as hipRTC would get it, through the target's back end (and, where a device
    library is installed, linked into a code object as hipRTC links it)."""
    target, extra, pch, note, clang = amd_target

    def args(v, out):
        return [*HIPCC_BASE, *extra, "-include-pch", str(pch), *kernel_options(*v, hip=True), "-c",
                str(KERNEL_SOURCE), "-o", str(out)]

    def cmd(v):
        out = tmp_path / ("k_%d_%d_%d_%d" % v)
        if clang is None:
            return [hipcc, f"--offload-arch={target}", *args(v, out)]
        return [*clang, *args(v, out)]

    variants = all_variants()
    if clang is not None:  # the direct call builds what hipcc builds, byte for byte
        first = tmp_path / "through-hipcc"
        r = _run([hipcc, f"--offload-arch={target}", *args(variants[0], first)], HIP_ENV)
        assert r.returncode == 0, r.stderr[-3000:]
    bad = _problems(_compile_all(cmd, variants, HIP_ENV))
    if clang is not None and not bad:
        assert first.read_bytes() == (tmp_path / ("k_%d_%d_%d_%d" % variants[0])).read_bytes(), \
            f"{target}: clang called directly ({shlex.join(clang)}) does not build what hipcc builds"
    assert not bad, f"{target}{' (' + note + ')' if note else ''}: {len(bad)} variants\n" + "\n".join(bad[:5])


def test_hipcc_code_object_rounds_to_nearest_and_keeps_subnormals(amd_target, hipcc, tmp_path):
    """With the run-time options the kernel descriptor asks the GPU for round-to-nearest-even and
    kept subnormals (mode 3) in float32 (MXFP4 scales of 2^-127 and 2^-128, F64 values below
    2^-126) and in float16 (the output conversion, v_cvt_f16_f32). cupy.RawModule would add
    -fcuda-flush-denormals-to-zero, which turns the float32 mode to 0 (flushed)."""
    target, extra, pch, _, _ = amd_target
    mxfp4 = next(v for v in all_variants() if v[0] == 39 and v[1] == 1)

    def modes(*more):
        asm = tmp_path / "mxfp4.s"
        r = _run([hipcc, *HIPCC_BASE, f"--offload-arch={target}", *[e for e in extra if e != "-S"], "-include-pch",
                  str(pch), *kernel_options(*mxfp4, hip=True), *more, "-c", "-S", str(KERNEL_SOURCE), "-o", str(asm)],
                 HIP_ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        return dict(re.findall(r"\.amdhsa_float_(\w+_mode_(?:32|16_64))\s+(\d+)", asm.read_text()))

    assert modes() == {"round_mode_32": "0", "round_mode_16_64": "0", "denorm_mode_32": "3",
                       "denorm_mode_16_64": "3"}, target
    assert modes("-fcuda-flush-denormals-to-zero")["denorm_mode_32"] == "0"  # what RawModule would ask


# -- NVIDIA: nvcc ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nvcc():
    return _compiler("nvcc", ci_must_have=False)


def test_nvcc_compiles_every_variant(nvcc, tmp_path):
    """Every variant, as NVRTC would get it, to cubins for sm_80 and sm_90 (ptxas included).
    One front-end pass serves both targets while the source has no ``__CUDA_ARCH__`` branch;
    with one, each target gets its own."""
    per_arch = "__CUDA_ARCH__" in KERNEL_SOURCE.read_text()
    groups = [[t] for t in NVIDIA_TARGETS] if per_arch else [list(NVIDIA_TARGETS)]

    def cmd(v):
        variant, targets = v
        arch = targets[0].replace("sm_", "compute_")
        return [nvcc, "-fatbin", f"-gencode=arch={arch},code=[{','.join(targets)}]", *kernel_options(*variant, hip=False),
                str(KERNEL_SOURCE), "-o", str(tmp_path / ("k_%d_%d_%d_%d_" % variant + targets[0] + ".fatbin"))]

    bad = _problems(_compile_all(cmd, [(v, g) for v in all_variants() for g in groups]))
    assert not bad, f"{len(bad)} variants\n" + "\n".join(bad[:5])


def test_nvcc_keeps_float32_subnormals(nvcc, tmp_path):
    """No flush-to-zero float32 arithmetic in the PTX of a run-time compile (NVRTC's default,
    unlike cupy.RawModule's -ftz=true)."""
    mxfp4 = next(v for v in all_variants() if v[0] == 39 and v[1] == 0)
    ptx = tmp_path / "mxfp4.ptx"
    r = _run([nvcc, "-ptx", "-arch=compute_80", *kernel_options(*mxfp4, hip=False), str(KERNEL_SOURCE), "-o", str(ptx)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = ptx.read_text()
    assert "mul.rn.f32" in text and ".ftz" not in text
