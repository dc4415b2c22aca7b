"""Build script: the C++/CUDA extension is optional.

The package is pure Python plus optional compiled kernels. ``csrc/cpu/*.cpp``
is compiled whenever torch is importable at build time (``pip install
--no-build-isolation .``), ``csrc/cuda/*.cu`` too when torch has CUDA and nvcc
is found. ``AUTOLR_FUSED_NO_EXT=1`` skips every extension; without a toolchain
(or without torch in the build environment) the package installs without them
and falls back to the reference backend.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup


def extensions() -> tuple[list, dict]:
    if os.environ.get("AUTOLR_FUSED_NO_EXT", "0") not in ("", "0"):
        return [], {}
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:  # no torch in an isolated build environment: pure-Python install
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and _torch_has_cuda()
    kwargs = dict(
        name="autolr_fused._C",
        sources=sources + (cuda_sources if use_cuda else []),
        include_dirs=[os.path.abspath("csrc/include")],
        # -ffp-contract=off: a * b + c is fused only where the source says so (madd), as in the CUDA kernels.
        extra_compile_args={
            "cxx": [
                "-O3",
                "-fno-math-errno",
                "-fno-trapping-math",
                "-ffp-contract=off",
                "-fopenmp",
                *_cpu_arch_flags(),
                *_unswitch_flags(),
            ],
            "nvcc": ["-O3"],
        },
        extra_link_args=["-fopenmp"],
        define_macros=[("AUTOLR_WITH_CUDA", "1")] if use_cuda else [],
    )
    ext = cpp_extension.CUDAExtension(**kwargs) if use_cuda else cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _unswitch_flags() -> list[str]:
    """gcc's limits on loop unswitching, raised where the compiler takes them.

    The element loops test a few flags that are constant in a call (weight decay, nesterov, first
    step); gcc vectorises such a loop by versioning it on them (unswitching), within size limits
    that the bfloat16/float16 loops exceed with their conversions, which left them scalar (9x slower
    than float32). -fno-trapping-math (above) lets the selects be if-converted; no result changes.
    """
    import subprocess
    import tempfile

    flags = ["--param=max-unswitch-insns=4000", "--param=max-unswitch-level=6"]
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            probe = subprocess.run(
                [compiler, *flags, "-Werror", "-c", source, "-o", os.path.join(tmp, "probe.o")], capture_output=True
            )
        except OSError:
            return []
    return flags if probe.returncode == 0 else []


def _cpu_arch_flags() -> list[str]:
    """AVX2 + FMA when the building CPU has them (the extension is built where it runs).

    ``AUTOLR_FUSED_CPU_FLAGS`` overrides, e.g. ``""`` for a portable x86-64 build.
    """
    override = os.environ.get("AUTOLR_FUSED_CPU_FLAGS")
    if override is not None:
        return override.split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
