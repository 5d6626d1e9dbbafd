#!/usr/bin/env bash
# For a session lent a GPU machine (the device tool). Two phases, one device call each, so
# each ends well inside the 10-minute limit of one command and a failure costs one phase:
#
#   bash bench/gpu.sh test    builds the extension in place for the visible GPU, runs the
#                             kernel tests (the files in GPU_TESTS; the trainer, data and
#                             integration tests are CPU-only and CI runs them)
#   bash bench/gpu.sh bench   `mars bench --device cuda` (BENCH_ARGS adds options, e.g.
#                             BENCH_ARGS="--op fused_lm_head") and Nsight Compute on the
#                             policy-loss kernels at 1024 x 8192 bf16; builds first only if
#                             no extension is built (a warm machine keeps the test phase's)
#   bash bench/gpu.sh         both
#
# The device tool brings back at most 8 files from $OUT: this writes summary.txt (device,
# versions, build and test outcome, each phase's seconds), results.md, results.json and
# bundle-<phase>.tar.gz (logs, plots, ncu CSV; the .ncu-rep when under 12 MB) and nothing
# else. Commit them under bench/results/gpu-<card>/ (unpack the plots; keep the logs out).
# TEST_TIMEOUT (480 s) and BENCH_TIMEOUT (420 s) stop a phase early enough to still write
# its files (a run of the device tool is killed at its timeout_s, whatever was left undone).
# Needs no network: the machine's python3, torch, triton and pytest are used. The peers it
# lacks (Liger-Kernel, Cut Cross-Entropy) come as wheels: `bash bench/gpu_wheels.sh` here,
# then `carry: [".whl"]` in the device call; they are installed into /tmp/site from .whl/.
set -uo pipefail
phase=${1:-all}
case "$phase" in test|bench|all) ;; *) echo "usage: bash bench/gpu.sh [test|bench|all]"; exit 2 ;; esac
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
GPU_TESTS=${GPU_TESTS:-"tests/test_advantage*.py tests/test_policy_loss*.py tests/test_loss_*.py
  tests/test_fused_linear*.py tests/test_triton_kernels_compile.py tests/test_setup_cuda_arch.py
  tests/test_example_plain_pytorch.py tests/test_bench_cli.py tests/test_public_api.py"}
summary="$out/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

{
  echo "# bench/gpu.sh $phase, $(date -u +%Y-%m-%dT%H:%M:%SZ), mars $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >> "$summary" 2>&1
cat "$summary"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    && note "peers from .whl: $(cd .whl && ls *.whl | tr '\n' ' ')"
fi

built() { ls mars/_C*.so > /dev/null 2>&1 && python3 -c "import mars._ext as e; raise SystemExit(0 if e.HAS_CUDA_KERNELS else 1)" 2>/dev/null; }

build() {
  local t=$SECONDS
  if ! python3 setup.py build_ext --inplace > "$work/build.log" 2>&1; then
    note "build: FAILED after $((SECONDS - t)) s"; tail -30 "$work/build.log" | tee -a "$summary"; return 1
  fi
  note "build: ok in $((SECONDS - t)) s ($(grep -m1 'mars: building' "$work/build.log"))"
  python3 -c "import mars; [print(' ', k, v) for k, v in mars.backends().items()]" 2>&1 | tee -a "$summary"
}

run_tests() {
  local t=$SECONDS par=()
  # pytest-xdist is on the machine: 4 workers share the GPU, one test file each at a time
  python3 -c "import xdist" 2>/dev/null && par=(-n 4 --dist loadfile)
  # shellcheck disable=SC2086  # GPU_TESTS is a list of globs
  timeout "${TEST_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider "${par[@]}" $GPU_TESTS \
    > "$work/tests.log" 2>&1
  local rc=$?
  note "tests: rc $rc in $((SECONDS - t)) s: $(tail -1 "$work/tests.log")"
  grep -E "^(FAILED|ERROR)" "$work/tests.log" | head -40 | tee -a "$summary"
  return $rc
}

run_bench() {
  local t=$SECONDS
  # shellcheck disable=SC2086  # BENCH_ARGS holds several options
  timeout "${BENCH_TIMEOUT:-420}" python3 -m mars.bench --device cuda --output "$work/bench" ${BENCH_ARGS:-} \
    > "$work/bench.log" 2>&1
  local rc=$?
  note "bench: rc $rc in $((SECONDS - t)) s"
  tail -5 "$work/bench.log" | tee -a "$summary"
  cp "$work/bench/results.md" "$work/bench/results.json" "$out/" 2>/dev/null
  t=$SECONDS
  if command -v ncu > /dev/null; then
    # the policy-loss kernels (csrc/cuda/policy_loss.cu) at the roofline shape, after warm-up;
    # --clock-control none: the card's clocks are left as they are
    ncu --set full --clock-control none --kernel-name regex:policy_loss --launch-skip 4 --launch-count 4 \
      -f -o "$work/ncu_policy_loss" \
      python3 -m mars.bench --device cuda --op policy_loss --impl mars-cuda \
        --size "1024x8192 bf16" --no-plots --quiet --output "$work/ncu_run" > "$work/ncu.log" 2>&1
    ncu --import "$work/ncu_policy_loss.ncu-rep" --page details --csv > "$work/ncu_policy_loss.csv" 2>>"$work/ncu.log"
    note "ncu: rc $? in $((SECONDS - t)) s"
    if [ "$(stat -c %s "$work/ncu_policy_loss.ncu-rep" 2>/dev/null || echo 0)" -gt 12000000 ]; then
      rm -f "$work/ncu_policy_loss.ncu-rep"; note "ncu: the .ncu-rep is over 12 MB, left out (the CSV is in the bundle)"
    fi
  else
    note "ncu: not found, no Nsight Compute profile"
  fi
  return $rc
}

rc=0
if [ "$phase" != bench ] || ! built; then
  build || { tar -czf "$out/bundle-$phase.tar.gz" -C "$work" . ; exit 1; }
fi
if [ "$phase" != bench ]; then run_tests || rc=1; fi
if [ "$phase" != test ]; then run_bench || rc=1; fi
tar -czf "$out/bundle-$phase.tar.gz" -C "$work" .
note "done: rc $rc, $(ls "$out" | tr '\n' ' ')"
exit $rc
