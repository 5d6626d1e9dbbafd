#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before the device calls: downloads the peers that the GPU
# machine lacks (Liger-Kernel, Cut Cross-Entropy: pure-Python wheels, about 1 MB together;
# their torch and triton are already there) into .whl/, which git ignores locally. Then give
# the device calls `carry: [".whl"]`; bench/gpu.sh installs what it finds there.
# verl is left out: its core_algos imports ray, whose wheel alone is over the 64 MiB carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for pkg in liger-kernel==0.8.5 cut-cross-entropy==25.1.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
ls -la .whl
