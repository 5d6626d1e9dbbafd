"""setup.py's GPU targets for the compiled kernels (policy loss, advantage): without
TORCH_CUDA_ARCH_LIST and without a visible GPU it builds for sm_80, sm_90 and PTX, which
torch turns into nvcc flags that this nvcc accepts; the install's build record names what
was compiled. setup.py is read, not imported (importing it would run the build)."""
import ast
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_archs() -> str:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCHS"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCHS")


def arch_flags(arch_list: str) -> list:
    from torch.utils import cpp_extension
    prev = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension._get_cuda_arch_flags()
    finally:
        if prev is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = prev


def test_default_targets_are_sm80_sm90_and_ptx():
    assert default_archs() == "8.0;9.0+PTX"
    flags = arch_flags(default_archs())
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX: newer GPUs JIT it


def test_nvcc_accepts_the_default_targets(tmp_path):
    """The flags compile a kernel with the toolkit setup.py would pick (no GPU needed)."""
    if not torch.version.cuda:
        pytest.skip("torch without CUDA: setup.py builds no CUDA kernels")
    nvcc = None
    for home in (os.environ.get("CUDA_HOME"), f"/usr/local/cuda-{torch.version.cuda}",
                 "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            nvcc = os.path.join(home, "bin", "nvcc")
            break
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n")
    proc = subprocess.run([nvcc, "-c", str(src), "-o", str(tmp_path / "k.o"),
                           *arch_flags(default_archs())], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    obj = (tmp_path / "k.o").read_bytes()
    assert b"sm_80" in obj and b"sm_90" in obj


def test_build_record_names_the_targets():
    """mars/_build_info.py (written by setup.py's build_ext beside mars._C) records the arch list the CUDA kernels of
    this install were compiled for (TORCH_CUDA_ARCH_LIST, or the default)."""
    info = pytest.importorskip("mars._build_info")
    if not info.CUDA_BUILT:
        pytest.skip(f"CUDA kernels not built: {info.CUDA_SKIPPED_BECAUSE}")
    assert info.CUDA_ARCH_LIST, "a CUDA build must record its targets"
    if not info.CUDA_ARCH_LIST.startswith("torch's default"):
        assert arch_flags(info.CUDA_ARCH_LIST)


# C++20 names and headers: torch 2.12+ builds extensions as C++20 (its headers require it),
# torch <= 2.11 (the GPU machine's 2.11.0+cu130) as C++17, so csrc/ must compile as both.
# std::bit_cast broke the build against torch 2.11 once; this list is the usual suspects.
CXX20_ONLY = ("std::bit_cast", "#include <bit>", "#include <span>", "#include <ranges>",
              "#include <concepts>", "#include <numbers>", "#include <format>", "std::span<",
              "std::ranges::", "std::format(", "std::ssize(", "consteval ", "constinit ",
              "using enum ", "[[likely]]", "[[unlikely]]", ".contains(", ".starts_with(",
              ".ends_with(", "std::midpoint(", "std::lerp(", "<=>")


def test_csrc_stays_within_cxx17():
    hits = []
    for d, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in files:
            if name.endswith((".cpp", ".cu", ".h", ".cuh")):
                path = os.path.join(d, name)
                for i, line in enumerate(open(path, encoding="utf-8"), 1):
                    code = line.split("//", 1)[0]
                    hits += [f"{os.path.relpath(path, ROOT)}:{i}: {w}" for w in CXX20_ONLY if w in code]
    assert not hits, "C++20 in csrc/ (torch <= 2.11 builds as C++17):\n" + "\n".join(hits)
