"""Builds flashattn_ext._C (the CUDA kernels) with torch.utils.cpp_extension and ninja.

Knobs (environment variables):
  FLASHATTN_EXT_CUDA_ARCHS  ';'-separated SM targets, default CUDA_ARCHS of flashattn_ext/_build_config.py.
  FLASHATTN_EXT_HEAD_DIMS   ';'-separated head dims to compile, default all HEAD_DIMS of _build_config.py.
  MAX_JOBS                  parallel nvcc jobs; default min(cores, free memory / 2.5 GB).
  FLASHATTN_EXT_NVCC_FLAGS  extra nvcc flags (tuning, e.g. -DFAE_TILE_D=128 -DFAE_TILE_N=32 ...).
  CUDA_HOME                 CUDA toolkit; found from nvcc when unset (nvcc on PATH may be a wrapper).

Project metadata (name, version from flashattn_ext/_version.py, dependencies) lives in pyproject.toml; this
file only describes the extension. pip hides a build's output unless -v, so the one line saying what is built
is also written to the terminal (see announce); `pip install -v` shows ninja's per-file [n/N] progress.
"""
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import time

from setuptools import setup

ROOT = pathlib.Path(__file__).parent.resolve()
CONFIG = runpy.run_path(str(ROOT / "flashattn_ext" / "_build_config.py"))  # the one dtype x head dim x arch list
ALL_HEAD_DIMS = list(CONFIG["HEAD_DIMS"])


def _has_cudart(home):
    return any((pathlib.Path(home) / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))


def find_cuda_home():
    """A toolkit folder with include/ and libcudart. nvcc on PATH can be a wrapper script or a symlink whose
    parent folder has no lib64 (torch's own guess then fails at link time), so ask nvcc where it lives."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if not _has_cudart(env):
            sys.exit(f"flashattn_ext: CUDA_HOME={env} has no lib64/libcudart.so; point CUDA_HOME at the CUDA "
                     "toolkit folder that has include/ and lib64/libcudart.so (e.g. /usr/local/cuda-13.0).")
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:  # `nvcc --dryrun` prints the toolkit root as "#$ TOP=..."
            out = subprocess.run([nvcc, "--dryrun", "-v", "x.cu"], capture_output=True, text=True).stderr
            top = re.search(r"TOP=(\S+)", out)
            if top:
                candidates.append(os.path.realpath(top.group(1).rstrip("/").removesuffix("/bin/..")
                                                   .removesuffix("/bin")))
        except OSError:
            pass
        candidates.append(str(pathlib.Path(os.path.realpath(nvcc)).parent.parent))
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if _has_cudart(c) and (pathlib.Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    sys.exit("flashattn_ext: no CUDA toolkit with lib64/libcudart.so found (tried: " + ", ".join(candidates) +
             "). Set CUDA_HOME to the toolkit folder.")


def nvcc_release(home):
    """'13.0' from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88"), or '?'."""
    try:
        out = subprocess.run([str(pathlib.Path(home) / "bin" / "nvcc"), "--version"], capture_output=True,
                             text=True).stdout
    except OSError:
        return "?"
    found = re.search(r"release (\S+),", out)
    return found.group(1) if found else "?"


def arch_flags(archs):
    flags = []
    for a in archs:
        num = a.rstrip("a")
        if not num.isdigit():
            sys.exit(f"flashattn_ext: bad entry {a!r} in FLASHATTN_EXT_CUDA_ARCHS (expected e.g. 80;90a)")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    return flags


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        avail_kb = int(re.search(r"MemAvailable:\s+(\d+)", open("/proc/meminfo").read()).group(1))
        by_mem = max(1, int(avail_kb / (2.5 * 1024 * 1024)))  # one nvcc of these kernels peaks near 2 GB
    except (OSError, AttributeError):
        by_mem = cores
    return max(1, min(cores, by_mem))


def announce(line):
    """Print line, and also write it to the controlling terminal when stdout is captured: pip runs the build
    with stdout piped into its log and shows it only with -v or on failure, and a silent multi-minute build
    looks hung. No terminal (CI, IDEs): stdout only."""
    print(line, flush=True)
    if sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\n{line}\n")
    except OSError:
        pass


def make_build_ext(BuildExtension, summary):
    class AnnouncedBuildExt(BuildExtension):
        """BuildExtension (ninja) that says what it builds before it starts and how long it took."""

        def build_extensions(self):
            announce(f"{summary}; per-file progress: pip install -v")
            t0 = time.monotonic()
            super().build_extensions()
            announce(f"flashattn_ext: built the CUDA extension in {time.monotonic() - t0:.0f} s")

    return AnnouncedBuildExt.with_options(use_ninja=True)


def make_extension():
    os.environ["CUDA_HOME"] = find_cuda_home()  # before torch.utils.cpp_extension reads it
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    default_archs = ";".join(CONFIG["CUDA_ARCHS"])
    archs = [a for a in os.environ.get("FLASHATTN_EXT_CUDA_ARCHS", default_archs).replace(",", ";").split(";") if a]
    dims_env = os.environ.get("FLASHATTN_EXT_HEAD_DIMS", "")
    head_dims = [int(d) for d in dims_env.replace(",", ";").split(";") if d] or ALL_HEAD_DIMS
    bad = [d for d in head_dims if d not in ALL_HEAD_DIMS]
    if bad:
        sys.exit(f"flashattn_ext: FLASHATTN_EXT_HEAD_DIMS has unsupported {bad}; choose from {ALL_HEAD_DIMS}")

    csrc = ROOT / "csrc"
    decode_dims = [d for d in CONFIG["DECODE_HEAD_DIMS"] if d in head_dims]
    sources = sorted((csrc / "host").glob("*.cpp"))
    for cu in sorted((csrc / "instantiations").glob("*.cu")):
        dim = re.search(r"hdim(\d+)", cu.name)
        if (int(dim.group(1)) in head_dims) if dim else bool(decode_dims):  # merge_states.cu: with decode
            sources.append(cu)
    # The host dispatch (csrc/host, compiled by c++ only) switches over exactly these lists (csrc/host/switch.h).
    # Not passed to nvcc, which would split a -D value at its commas; the .cu files need none of them.
    host_defines = [f"-DFAE_HEAD_DIMS={','.join(map(str, head_dims))}", f'-DFAE_CUDA_ARCHS="{";".join(archs)}"']
    if decode_dims:
        host_defines.append(f"-DFAE_DECODE_HEAD_DIMS={','.join(map(str, decode_dims))}")
    for name in ("FA3_HEAD_DIMS", "FA3_BWD_HEAD_DIMS"):  # the Hopper family's head dims (may be empty)
        host_defines.append(f"-DFAE_{name}={','.join(str(d) for d in CONFIG[name] if d in head_dims)}")
    # No -std: torch picks the C++ standard its headers need (17 for 2.11, 20 for 2.14).
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *arch_flags(archs)]
    nvcc_flags += os.environ.get("FLASHATTN_EXT_NVCC_FLAGS", "").split()  # tuning experiments
    cxx_flags = ["-O3", *host_defines]
    summary = (f"flashattn_ext: CUDA_HOME={os.environ['CUDA_HOME']} (nvcc {nvcc_release(os.environ['CUDA_HOME'])}) "
               f"archs={archs} head_dims={head_dims} MAX_JOBS={os.environ['MAX_JOBS']} sources={len(sources)}")
    ext = CUDAExtension(
        name="flashattn_ext._C",
        sources=[str(s.relative_to(ROOT)) for s in sources],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": make_build_ext(BuildExtension, summary)}


ext_modules, cmdclass = ([], {}) if os.environ.get("FLASHATTN_EXT_SKIP_BUILD") else make_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
