"""Untuned default schedules vs meta_schedule-tuned ones, one pattern layer and one dense layer.

Each single-layer model (conv3x3 + bias + ReLU, ``models.conv3x3_model``) is tuned with
``tvm_patdnn.tune`` for the same number of trials, then compiled twice: default schedules only
(``tuning_db=False``) and with the tuning records. Both modules of a layer are timed in
interleaved rounds (the box is shared) and the table gives medians and the tuned/default ratio.
The pattern layer is pruned by the project's pruning core (8 magnitude-chosen patterns + 3.6x
connectivity); the dense layer is the same kind of layer unpruned, on TVM's dense path.

    .venv/bin/python -m benchmarks.tuning [--trials 32] [--rounds 5] [--db DIR] [--shipped] [--json out.json]

``--shipped`` adds the whole VGG-16 CIFAR benchmark model (``models.twins("vgg16_cifar").pruned``), default
schedules vs the database shipped for this machine in tvm_patdnn/schedules/ (no tuning in the run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm

import tvm_patdnn
from tvm_patdnn.pruning import project_pattern_and_connectivity, select_pattern_set
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.tuning.database import RECORDS, SCHEDULES_DIR, shipped_database, target_key

from .layers import save_results
from .models import conv3x3_model, twins
from .runtimes import time_ms, vm_of

# (name, channels, size, pruned?)
LAYERS = [("pattern 64ch 56x56, 8x", 64, 56, True), ("dense 64ch 28x28", 64, 28, False)]


def layer(channels: int, size: int, pruned: bool):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
    if pruned:
        weight = project_pattern_and_connectivity(weight, select_pattern_set([weight], n_patterns=8), 3.6)
    return conv3x3_model(weight, size), rng.standard_normal((1, channels, size, size)).astype(np.float32)


def compare(model, x: np.ndarray, database, rounds: int) -> dict[str, float]:
    """Median ms of the model compiled with default schedules only and with the records."""
    target = resolve_target("x86")
    default = tvm_patdnn.compile(model, target, tuning_db=False)
    tuned = tvm_patdnn.compile(model, target, tuning_db=database)
    name = default.input_names[0]
    expected, actual = default.run({name: x})[0], tuned.run({name: x})[0]
    assert np.allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()), "tuned output differs"
    vms = {"default": vm_of(default.executable), "tuned": vm_of(tuned.executable)}
    tx = tvm.runtime.tensor(x)
    samples = {key: [] for key in vms}
    for _ in range(rounds):
        for key, vm in vms.items():
            samples[key].append(time_ms(vm, tx, number=3))
    median = {key: statistics.median(values) for key, values in samples.items()}
    return {"default_ms": median["default"], "tuned_ms": median["tuned"],
            "default_over_tuned": median["default"] / median["tuned"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32, help="search trials per layer (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db", type=Path, help="keep the tuning records here (default: a temporary directory)")
    parser.add_argument("--shipped", action="store_true",
                        help="also compare VGG-16 CIFAR (the model the shipped records were tuned for) with the shipped tvm_patdnn/schedules/ database")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/tuning.json"))
    args = parser.parse_args()

    target = resolve_target("x86")
    rows = []
    with tempfile.TemporaryDirectory(prefix="patdnn-bench-tune-") as scratch:
        db = args.db or Path(scratch)
        for name, channels, size, pruned in LAYERS:
            model, x = layer(channels, size, pruned)
            started = time.monotonic()
            tvm_patdnn.tune(model, target, trials=args.trials, database=db, progress=sys.stderr)
            rows.append({"layer": name, "trials": args.trials, "tune_s": time.monotonic() - started,
                         **compare(model, x, db, args.rounds)})
    if args.shipped:
        shipped = shipped_database(target)
        if shipped is None:
            raise SystemExit(f"no shipped database for {target_key(target)} in {SCHEDULES_DIR}")
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        trials = sum(1 for line in (shipped / RECORDS).read_text().splitlines() if json.loads(line)[1][0][1])
        rows.append({"layer": "VGG-16 CIFAR 8x, whole model (shipped schedules)", "trials": trials, "tune_s": None,
                     **compare(twins("vgg16_cifar").pruned, x, shipped, args.rounds)})

    print("| layer | trials | tune time s | default ms | tuned ms | default / tuned |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tune_s = "-" if r["tune_s"] is None else f"{r['tune_s']:.0f}"
        print(f"| {r['layer']} | {r['trials']} | {tune_s} | {r['default_ms']:.3f} | {r['tuned_ms']:.3f} | "
              f"{r['default_over_tuned']:.2f}x |")
    save_results(args.json, target, args.rounds, rows)


if __name__ == "__main__":
    main()
