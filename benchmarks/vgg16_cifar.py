"""Tunes the benchmark model whose tuning records ship in ``tvm_patdnn/schedules/``.

The model is VGG-16 CIFAR pruned 8x (``models.twins("vgg16_cifar").pruned``: He-normal weights
from a fixed seed, 8 magnitude-chosen patterns, 3.6x connectivity, the first conv dense), the same
on every machine, so records tuned anywhere match its pattern-conv kernels everywhere.

    .venv/bin/python -m benchmarks.vgg16_cifar --trials 320     # tunes into tvm_patdnn/schedules/<target key>/
"""

from __future__ import annotations

import argparse
import sys

import tvm_patdnn
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.tuning.commands import format_results
from tvm_patdnn.tuning.database import SCHEDULES_DIR, target_key

from .models import twins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86")
    parser.add_argument("--trials", type=int, default=320)
    parser.add_argument("--rpc", help="TRACKER_HOST:PORT:DEVICE_KEY of the device to tune on")
    args = parser.parse_args()
    target = resolve_target(args.target)
    database = SCHEDULES_DIR / target_key(target)
    results = tvm_patdnn.tune(twins("vgg16_cifar").pruned, target, trials=args.trials, database=database, rpc=args.rpc,
                              progress=sys.stderr)
    print(format_results(results))
    print(f"\nrecords in {database}")


if __name__ == "__main__":
    main()
