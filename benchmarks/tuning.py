"""Untuned default schedules vs meta_schedule-tuned ones, one pattern layer and one dense layer.

Each single-layer model (conv3x3 + bias + ReLU, ``models.conv3x3_model``) is tuned with
``tvm_patdnn.tune`` for the same number of trials, then compiled twice: default schedules only
(``tuning_db=False``) and with the tuning records. Both modules of a layer are timed in process
CPU time (``runtimes.cpu_ms``: run it pinned, ``taskset -c 1``, at ``TVM_NUM_THREADS=1``) in
rotated interleaved rounds (the box is shared) and the table gives medians and the default/tuned
ratio.
The pattern layer is pruned by the project's pruning core (8 magnitude-chosen patterns + 3.6x
connectivity); the dense layer is the same kind of layer unpruned, on TVM's dense path.

    .venv/bin/python -m benchmarks.tuning [--trials 32] [--rounds 5] [--db DIR] [--shipped] [--vgg16-db DIR] \\
        [--json out.json]

``--shipped`` adds the whole VGG-16 CIFAR benchmark model (``models.twins("vgg16_cifar").pruned``), default
schedules vs the database shipped for this machine in tvm_patdnn/schedules/ (no tuning in the run);
``--vgg16-db DIR`` the same against another database (a fresh tune of the model, before it
replaces the shipped one). The model's rows come with one row per kernel, so that a whole-model
ratio can be traced to the kernels whose records win or lose: each compiled kernel timed alone on
the arguments of its calls in one inference (warm caches, as the tuner measures it), and within
whole inferences (process CPU time between the VM's instrument calls before and after it).
``--trials 0`` skips the single layers.

Each database's kernels also list what ``tune`` reports for them from its records (its summary's
rows): the search's own claim (its default record's time over its fastest record's) and, for
tunes that verify, the verified ratio and verdict, so the tuner's printed speedups can be checked
against the in-process A/B; the dense layers' kernel choices (named by layer) are listed after the
table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import tvm

import tvm_patdnn
from tvm_patdnn.pruning import project_pattern_and_connectivity, select_pattern_set
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.analysis import PatternOptions
from tvm_patdnn.frontend import load_model
from tvm_patdnn.transform.kernel_choice import KernelChoices
from tvm_patdnn.tuning.database import RECORDS, SCHEDULES_DIR, AppendOnlyDatabase, shipped_database, target_key
from tvm_patdnn.tuning.kernel_records import recorded_layers
from tvm_patdnn.tuning.tasks import extract_tasks
from tvm_patdnn.tuning.threads import for_threads
from tvm_patdnn.tuning.tuner import TaskResult, TaskState

from .layers import save_results
from .models import conv3x3_model, twins
from .runtimes import cpu_ms, rotated_rounds

# (name, channels, size, pruned?)
LAYERS = [("pattern 64ch 56x56, 8x", 64, 56, True), ("dense 64ch 28x28", 64, 28, False)]


def layer(channels: int, size: int, pruned: bool):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
    if pruned:
        weight = project_pattern_and_connectivity(weight, select_pattern_set([weight], n_patterns=8), 3.6)
    return conv3x3_model(weight, size), rng.standard_normal((1, channels, size, size)).astype(np.float32)


def kernel_calls(compiled, x: np.ndarray) -> list[tuple[str, object, list]]:
    """(kernel name, compiled function, arguments) of every kernel call of one inference, in
    order; the VM's builtins (allocation, shape checks) are left out."""
    library = next(m for m in compiled.executable.mod.imports if m.kind == "llvm")
    calls = []

    def record(_func, name, before_run, _ret, *args) -> int:
        if before_run and not str(name).startswith("vm.builtin."):
            calls.append((str(name), library.get_function(str(name)), list(args)))
        return 0

    compiled.vm.set_instrument(record)
    try:
        compiled.vm["main"](tvm.runtime.tensor(x))
    finally:
        compiled.vm.set_instrument(lambda *_: 0)
    return calls


def in_model_ms(compiled, x: tvm.runtime.Tensor, runs: int = 20) -> list[float]:
    """Process CPU ms of each kernel call (the VM's builtins left out) within whole inferences,
    mean over ``runs``: a kernel as the model runs it, its weights and input where the previous
    layers left them (a kernel alone rereads them from L1/L2)."""
    main, started, spent = compiled.vm["main"], [], []

    def clock(_func, name, before_run, _ret, *_args) -> int:
        if before_run:
            started.append(time.process_time())
        elif not str(name).startswith("vm.builtin."):
            spent.append(time.process_time() - started.pop())
        else:
            started.pop()
        return 0

    main(x)
    compiled.vm.set_instrument(clock)
    try:
        for _ in range(runs):
            main(x)
    finally:
        compiled.vm.set_instrument(lambda *_: 0)
    calls = len(spent) // runs
    return [sum(spent[i::calls]) * 1e3 / runs for i in range(calls)]


def _time_in_model(compiled, x: tvm.runtime.Tensor, samples: list[list[float]]) -> float:
    """A rotated-rounds timer: keeps the per-call ms of one sample, returns their sum."""
    samples.append(in_model_ms(compiled, x))
    return sum(samples[-1])


def compare(model, x: np.ndarray, database, rounds: int, per_kernel: bool = False) -> dict:
    """Median ms of the model compiled with default schedules only and with the records; with
    ``per_kernel``, also each kernel's (summed over its calls) alone and within the model, all in
    one set of rotated rounds."""
    target = resolve_target("x86")
    compiled = {"default": tvm_patdnn.compile(model, target, tuning_db=False),
                "tuned": tvm_patdnn.compile(model, target, tuning_db=database)}
    name = compiled["default"].input_names[0]
    expected, actual = (compiled[key].run({name: x})[0] for key in ("default", "tuned"))
    assert np.allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()), "tuned output differs"
    tx = tvm.runtime.tensor(x)
    timers = {(key, None): lambda main=c.vm["main"]: cpu_ms(main, [tx], min_ms=100) for key, c in compiled.items()}
    kernels: dict[str, dict[str, list]] = {}  # kernel -> variant -> [(call position, function, arguments)]
    in_model: dict[str, list[list[float]]] = {key: [] for key in compiled}  # per round, ms per call position
    if per_kernel:
        # the i-th calls of both variants are the same layer, though a kernel choice may rename it
        for position, (default, tuned) in enumerate(zip(*(kernel_calls(c, x) for c in compiled.values()), strict=True)):
            kernel = default[0] if default[0] == tuned[0] else f"{default[0]} / {tuned[0]}"
            for key, (_name, fn, args) in zip(compiled, (default, tuned)):
                kernels.setdefault(kernel, {}).setdefault(key, []).append((position, fn, args))
        for kernel, by_key in kernels.items():
            for key, calls in by_key.items():
                timers[(key, kernel)] = lambda calls=calls: sum(cpu_ms(fn, args, min_ms=10) for _, fn, args in calls)
        for key, c in compiled.items():
            timers[(key, "in model")] = partial(_time_in_model, c, tx, in_model[key])
    median = {label: statistics.median(values) for label, values in rotated_rounds(timers, rounds).items()}

    def ratio(default_ms: float, tuned_ms: float, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}default_ms": default_ms, f"{prefix}tuned_ms": tuned_ms,
                f"{prefix}default_over_tuned": default_ms / tuned_ms}

    result = {**ratio(median[("default", None)], median[("tuned", None)]),
              "schedules": str(compiled["tuned"].schedules)}
    if per_kernel:
        def in_model_median(key: str, calls: list) -> float:
            return statistics.median(sum(sample[position] for position, *_ in calls) for sample in in_model[key])

        result["kernels"] = [
            {"kernel": kernel, "calls": len(by_key["default"]),
             **ratio(median[("default", kernel)], median[("tuned", kernel)]),
             **ratio(in_model_median("default", by_key["default"]), in_model_median("tuned", by_key["tuned"]),
                     "in_model_")}
            for kernel, by_key in kernels.items()]
    return result


def tuner_claims(model, database: Path, threads: int) -> dict[str, TaskResult]:
    """What ``tune`` reports for each of the model's tasks and dense layers from the records in
    ``database`` at ``threads`` (its summary's rows, without the failures of a run), by kernel or
    layer name (``conv 3x3 3->64 32x32``)."""
    target = for_threads(resolve_target("x86"), threads)
    layers = KernelChoices()
    tasks = extract_tasks(load_model(model).mod, target, PatternOptions(), kernel_choices=layers)
    claims = {r.name: TaskResult.of_layer(r) for r in recorded_layers(list(layers.seen.values()), target, database)}
    db = AppendOnlyDatabase(database, target)
    for task in tasks:
        state = TaskState(task)
        state.read(db)
        claims[task.name] = state.result()
    return claims


def _claim(claim: TaskResult) -> dict:
    return {"speedup": claim.speedup, "kept": claim.kept, "verified": claim.candidate_speedup,
            "search": claim.search_speedup}


def _verdict(tuner: dict) -> str:
    if tuner.get("kept") is None:
        return "-"
    return f"{tuner['verified']:.2f}x ({'kept' if tuner['kept'] else 'default'})"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32, help="search trials per layer (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db", type=Path, help="keep the tuning records here (default: a temporary directory)")
    parser.add_argument("--shipped", action="store_true",
                        help="also compare VGG-16 CIFAR (the model the shipped records were tuned for) with the shipped tvm_patdnn/schedules/ database")
    parser.add_argument("--vgg16-db", type=Path,
                        help="also compare VGG-16 CIFAR with the records in this database (e.g. a fresh tune of it)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/tuning.json"))
    args = parser.parse_args()

    target = resolve_target("x86")
    rows = []
    with tempfile.TemporaryDirectory(prefix="patdnn-bench-tune-") as scratch:
        db = args.db or Path(scratch)
        for name, channels, size, pruned in LAYERS if args.trials else []:
            model, x = layer(channels, size, pruned)
            started = time.monotonic()
            tvm_patdnn.tune(model, target, trials=args.trials, database=db, progress=sys.stderr)
            rows.append({"layer": name, "trials": args.trials, "tune_s": time.monotonic() - started,
                         **compare(model, x, db, args.rounds)})
    databases = []
    if args.shipped:
        shipped = shipped_database(target)
        if shipped is None:
            raise SystemExit(f"no shipped database for {target_key(target)} in {SCHEDULES_DIR}")
        databases.append(("shipped schedules", shipped))
    if args.vgg16_db:
        databases.append((args.vgg16_db.name, args.vgg16_db))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for label, database in databases:
        trials = sum(1 for line in (database / RECORDS).read_text().splitlines() if json.loads(line)[1][0][1])
        model = twins("vgg16_cifar").pruned
        row = {"layer": f"VGG-16 CIFAR 8x, whole model ({label})", "trials": trials, "tune_s": None,
               **compare(model, x, database, args.rounds, per_kernel=True)}
        claims = tuner_claims(model, database, tvm.runtime.num_threads())
        for kernel in row["kernels"]:
            claim = claims.pop(kernel["kernel"], None)
            if claim is not None:
                kernel["tuner"] = _claim(claim)
        # dense layers (their kernels are named by the kernel, not the layer) and tasks not called
        row["other_claims"] = {name: _claim(claim) for name, claim in claims.items()}
        rows.append(row)

    print("| layer | trials | tune time s | default ms | tuned ms | default / tuned "
          "| in the model: default ms | tuned ms | default / tuned | tuner: verified (verdict) | search said |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tune_s = "-" if r["tune_s"] is None else f"{r['tune_s']:.0f}"
        print(f"| {r['layer']} | {r['trials']} | {tune_s} | {r['default_ms']:.3f} | {r['tuned_ms']:.3f} | "
              f"{r['default_over_tuned']:.2f}x | | | | | |")
        for k in r.get("kernels", []):
            tuner = k.get("tuner", {})
            verified, search = _verdict(tuner), _ratio(tuner.get("search"))
            print(f"| {k['kernel']} (x{k['calls']}) | | | {k['default_ms']:.3f} | {k['tuned_ms']:.3f} | "
                  f"{k['default_over_tuned']:.2f}x | {k['in_model_default_ms']:.3f} | {k['in_model_tuned_ms']:.3f} | "
                  f"{k['in_model_default_over_tuned']:.2f}x | {verified} | {search} |")
    for r in rows:
        print(f"{r['layer']}: {r['schedules']}")
        for name, tuner in r.get("other_claims", {}).items():
            print(f"  tuner on {name}: {_verdict(tuner)}, search said {_ratio(tuner['search'])}")
    save_results(args.json, target, args.rounds, rows)


if __name__ == "__main__":
    main()
