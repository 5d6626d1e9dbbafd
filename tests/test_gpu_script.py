"""bench/gpu.sh, the script a session lent a GPU runs (docs/bench.md): its shell is valid and
its default test list reaches every test file written for the GPU (a `gpu` mark, HAS_GPU, or
CUDA tensors), so a new GPU test is not left out of the one GPU run a task may get."""
import fnmatch
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu.sh")
GPU_USE = re.compile(r"HAS_GPU|from conftest import [^\n]*\bgpu\b|@gpu\b|mark\.gpu|"
                     r"torch\.cuda\.is_available\(\)|device=[\"']cuda")


def default_gpu_tests() -> list[str]:
    m = re.search(r'GPU_TESTS=\$\{GPU_TESTS:-"([^"]*)"\}', open(SCRIPT).read())
    assert m, "bench/gpu.sh sets no default GPU_TESTS"
    return m.group(1).split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_is_valid_bash():
    p = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["bash", SCRIPT, "nope"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "usage" in p.stdout


def test_default_test_list_covers_every_gpu_test_file():
    globs = default_gpu_tests()
    tests = sorted(f for f in os.listdir(os.path.join(ROOT, "tests"))
                   if f.startswith("test_") and f.endswith(".py") and f != os.path.basename(__file__))
    uses_gpu = [f for f in tests
                if GPU_USE.search(open(os.path.join(ROOT, "tests", f), encoding="utf-8").read())]
    covered = {f for f in tests for g in globs if fnmatch.fnmatch("tests/" + f, g)}
    assert uses_gpu and not set(uses_gpu) - covered, sorted(set(uses_gpu) - covered)
    assert all(any(fnmatch.fnmatch("tests/" + f, g) for f in tests) for g in globs), globs
    assert not {"test_train_distributed.py", "test_train_distributed_runs.py"} & covered  # CPU-only (gloo): CI runs them
