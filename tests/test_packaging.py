"""What a non-editable install ships: the Python packages and their data files as setuptools
lays them out (``setup.py build_py``, the step ``pip install .`` runs before compiling), used
from outside the source checkout. ``mars bench``, ``mars train``'s shipped configs and the
verl recipe's hydra config must work from there, not only from ``/work/.../mars``.

The build runs on a copy of the tracked files (what a build packages; build_py writes
nothing into the source tree: ``mars/_build_info.py`` is build_ext's, beside the compiled
extension). The compiled ``mars._C`` is not rebuilt: an editable
install maps it to the checkout, a plain one has it beside these files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):  # a file in a worktree
        pytest.skip("needs the git checkout (the tracked files are what a build packages)")
    tmp = tmp_path_factory.mktemp("pkg")
    src, lib = tmp / "src", tmp / "lib"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if not os.path.isfile(os.path.join(ROOT, rel)):  # deleted, not yet committed
            continue
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), src / rel)
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src,
                       env=dict(os.environ, MARS_BUILD_CUDA="0"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, lib


def _run(tmp, lib, *code_or_args, module=False):
    env = dict(os.environ, PYTHONPATH=str(lib))
    argv = [sys.executable, "-m", *code_or_args] if module else [sys.executable, "-c", *code_or_args]
    return subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def test_build_py_writes_nothing_into_the_source_tree(built):
    """setup.py writes its build record (mars/_build_info.py) in build_ext only, beside the
    compiled extension (the build directory; the source package for an in-place or editable
    build); build_py, sdist and egg_info leave the source tree as it is."""
    tmp, _ = built
    assert not (tmp / "src" / "mars" / "_build_info.py").exists()


def test_package_data_is_in_the_build(built):
    _, lib = built
    configs = sorted(os.listdir(lib / "mars" / "train" / "configs"))
    assert {"tiny.yaml", "grpo_mars_qwen2_5_vl_3b.yaml", "dapo_mars_qwen2_5_vl_3b.yaml"} <= set(configs)
    assert (lib / "mars" / "integrations" / "verl" / "config" / "mars_trainer.yaml").is_file()
    assert (lib / "mars_kernels").is_dir() and (lib / "mars" / "bench" / "cases.py").is_file()
    assert not (lib / "tests").exists() and not (lib / "bench").exists()  # the checkout's folders stay out


def test_the_build_imports_its_own_files_and_loads_shipped_configs(built):
    tmp, lib = built
    code = ("import json, mars, mars.bench, mars.train.config as c\n"
            "cfg = c.load_config('grpo_mars_qwen2_5_vl_3b', check_files=False)\n"
            "print(json.dumps({'mars': mars.__file__, 'bench': mars.bench.__file__, "
            "'config': c.config_path('tiny'), 'n': cfg.rollout.n}))")
    p = _run(tmp, lib, code)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("mars", "bench", "config"):
        assert got[key].startswith(str(lib)), (key, got[key])
    assert got["n"] > 1


def test_mars_bench_quick_runs_from_the_build(built):
    tmp, lib = built
    out = tmp / "bench-out"
    p = _run(tmp, lib, "mars", "bench", "--quick", "--op", "advantage", "--output", str(out), module=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["mode"] == "quick"
    res = doc["ops"]["advantage"]["groups"][0]["results"]
    assert res["mars-int"]["err"] == 0.0 and res["mars-int"]["median_s"] > 0
    assert "mars-int" in (out / "results.md").read_text()
    assert any(f.endswith(".png") for f in os.listdir(out / "plots"))


# verl 0.9.1's trainer (verl.trainer.ppo.ray_trainer, which the recipe subclasses) imports
# these at module level (workers/rollout/router.py: cachetools; workers/rollout/utils.py:
# uvicorn, fastapi) and does not declare them; tests/test_integration_verl.py imports the
# recipe's trainer with none of them stubbed.
VERL_UNDECLARED = ("cachetools", "fastapi", "uvicorn")


def _requirement_names(reqs):
    import re
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}


def test_verl_extra_installs_what_verls_trainer_imports():
    """`pip install 'mars[verl]'` (and the test extra CI installs) bring every module the
    verl recipe's import chain needs, not only verl itself."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for extra in ("verl", "test"):
        names = _requirement_names(extras[extra])
        assert "verl" in names, extra
        missing = [m for m in VERL_UNDECLARED if m not in names]
        assert not missing, f"the {extra!r} extra lacks {missing}, which verl 0.9.1's trainer imports"


def test_the_version_is_written_once():
    """pyproject.toml takes the version from mars.__version__ (setuptools reads the literal
    without importing mars), so a release bumps one line."""
    import re

    from setuptools.config.pyprojecttoml import read_configuration

    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    assert not re.search(r"(?m)^version\s*=", text.split("[tool.", 1)[0]), "pyproject.toml spells the version"
    with open(os.path.join(ROOT, "mars", "__init__.py"), encoding="utf-8") as f:
        ours = re.search(r'(?m)^__version__ = "([^"]+)"$', f.read()).group(1)
    assert read_configuration(os.path.join(ROOT, "pyproject.toml"), expand=True)["project"]["version"] == ours
