#!/usr/bin/env bash
# For a session lent a GPU machine (the device tool): builds the extension in place for
# that GPU, runs the whole test suite (GPU tests included) and the benchmarks, and writes
# device.txt, tests.log, bench.json and bench.md to $OUT (default bench/results/gpu).
# Needs no network: the machine's torch, triton, pytest and pytest-benchmark are used.
#   device run:  bash bench/gpu.sh     then commit the files under bench/results/gpu-<card>/
set -uo pipefail
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python3 -c "import mars; print({k: v for k, v in mars.backends().items()})"
python3 -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
python3 -m pytest -q bench --benchmark-only --benchmark-json="$out/bench.json" \
  -p no:cacheprovider 2>&1 | tail -5
python3 bench/summarize.py "$out/bench.json" > "$out/bench.md" && cat "$out/bench.md"
