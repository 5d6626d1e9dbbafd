#!/usr/bin/env bash
# For a session lent a GPU machine (the device tool): builds the extension in place for
# that GPU, runs the whole test suite (GPU tests included), `mars bench --device cuda`
# and Nsight Compute on the policy-loss kernel (the op with a roofline goal), and writes
# device.txt, build.log, tests.log, bench.log, results.json, results.md, plots/ and
# ncu_policy_loss.* to $OUT (default bench/results/gpu).
# Needs no network: the machine's torch, triton and pytest are used.
#   device run:  bash bench/gpu.sh     then commit the files under bench/results/gpu-<card>/
# BENCH_ARGS adds options to the bench run (e.g. BENCH_ARGS="--op fused_lm_head").
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
# `python3 -m mars.bench` is `mars bench` without needing the console script installed
python3 -m mars.bench --device cuda --output "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -5
cat "$out/results.md"
if command -v ncu > /dev/null; then
  # the policy-loss kernels (csrc/cuda/policy_loss.cu) at the roofline shape, after warm-up
  ncu --set full --kernel-name regex:policy_loss --launch-skip 4 --launch-count 4 \
    -f -o "$out/ncu_policy_loss" \
    python3 -m mars.bench --device cuda --op policy_loss --impl mars-cuda \
      --size "1024x8192 bf16" --no-plots --quiet --output "$out/ncu_run" > "$out/ncu.log" 2>&1
  ncu --import "$out/ncu_policy_loss.ncu-rep" --page details --csv > "$out/ncu_policy_loss.csv" 2>>"$out/ncu.log"
  tail -3 "$out/ncu.log"
else
  echo "ncu not found: no Nsight Compute profile" | tee "$out/ncu.log"
fi
