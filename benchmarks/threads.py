"""From 1 to 2 threads: where a model loses its scaling, kernel by kernel, and why its samples spread.

One process with TVM's pool at 2 threads: the pool's size is fixed when it starts
(``TVM_NUM_THREADS``), but ``runtime.config_threadpool`` shrinks it to 1 and grows it back (TVM
0.27: ``tvm.runtime.num_threads()`` follows and a 2-task parallel loop runs on one thread; it
does not grow a pool past its start size), so the 1- and 2-thread builds (the model compiled for
``num-cores`` 1 and 2, untuned: the shipped records apply at 1 thread only) are timed in
alternating samples, in the same moments of a shared box. Each sample takes ``--runs`` inferences
with each kernel's time (:func:`tvm_patdnn.bench.kernel_runs`, the VM's instrument hook) and as
many without the hook, timed one by one, and records what could disturb it: the CPU other
processes took from this process's CPUs (``/proc/stat``) and this process's context switches.

Per kernel it prints the min and median over all inferences at 1 and 2 threads, the scaling and
the kernel's share of the 2-thread loss (its 2-thread time minus half its 1-thread time, summed over
kernels = what stands between the model and a 2x scaling). The min (and p10) is the statistic to
read: the box is shared and a 2-thread inference waits for its slowest thread, so disturbances only
add time. Before every sample it measures the fork/join cost of one parallel region (an empty
parallel loop), and it counts each kernel's parallel regions in the generated code.

    .venv/bin/python -m benchmarks.threads --rounds 20 [--model /path/to/pruned.onnx] [--json out.json]

``--settings`` times the whole model under settings TVM's pool reads when it starts, one process
each, the processes taking turns (a sample starts after the previous process's pool went to
sleep); give every variable its value (the benchmarks leave the pool unbound unless
``TVM_BIND_THREADS`` is set, :func:`tvm_patdnn.targets.keep_cpu_pinning`):

    .venv/bin/python -m benchmarks.threads --rounds 10 --settings bound:TVM_BIND_THREADS=1 \
        unbound:TVM_BIND_THREADS=0 "1 thread:TVM_NUM_THREADS=1"

``--one-thread`` runs the 2-thread build on one thread as well (the pool shrunk to 1), so its
"2t" columns are what the parallel code costs a thread beyond the 1-thread build's code (regions,
per-task allocations, outlined loop bodies): measurable on a busy box, where 2-thread samples are not.

Run it unpinned on a 2-core machine (the 2-thread samples need both cores); ``TVM_NUM_THREADS``
is set to 2 here unless given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402 - after TVM_NUM_THREADS: the pool reads it when it starts
import tvm  # noqa: E402

import tvm_patdnn  # noqa: E402
from tvm_patdnn.bench import kernel_runs  # noqa: E402
from tvm_patdnn.frontend import check_inputs, seeded_inputs  # noqa: E402

from .models import twins  # noqa: E402
from .runtimes import MAX_OTHERS, cpus_busy_s, settle  # noqa: E402


def resize_pool(threads: int) -> None:
    """Run TVM's parallel loops on ``threads`` threads of the pool from now on (at most its start size)."""
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    if tvm.runtime.num_threads() != threads:
        raise RuntimeError(f"TVM's pool did not resize to {threads} threads (it has {tvm.runtime.num_threads()}; "
                           "set TVM_NUM_THREADS to the largest count before the runtime starts)")


def parallel_regions(model) -> dict[str, int]:
    """Parallel regions in each kernel's generated code: its loads of ``__TVMBackendParallelLaunch``
    (one per parallel loop it launches), in its packed function or the body outlined from it."""
    counts: dict[str, int] = {}
    for module in model.executable.mod.imports:
        name = None
        for line in module.inspect_source("ll").splitlines():
            if line.startswith("define ") and "@" in line:
                name = line.split("@", 1)[1].split("(", 1)[0].strip('"').removeprefix("__tvm_ffi_")
                name = name.split("_compute_")[0]
            elif name and "load ptr, ptr @__TVMBackendParallelLaunch" in line:
                counts[name] = counts.get(name, 0) + 1
    return counts


def empty_region(threads: int):
    """A kernel whose only work is a parallel loop of ``threads`` one-store tasks, with its argument:
    a call costs the pool's fork/join (:func:`region_us`)."""
    from tvm.script import tirx as T

    @T.prim_func
    def touch(a: T.Buffer((threads, 16), "float32")):
        for t in T.parallel(threads):
            a[t, 0] = a[t, 0] + T.float32(1)

    target = tvm.target.Target({"kind": "llvm", "num-cores": threads})
    fn = tvm.compile(tvm.IRModule({"main": touch.with_attr("global_symbol", "main")}), target)["main"]
    return fn, tvm.runtime.tensor(np.zeros((threads, 16), np.float32))


def region_us(region, calls: int = 2000) -> float:
    """Mean µs of one call of an :func:`empty_region` kernel."""
    fn, arg = region
    fn(arg)
    start = time.perf_counter()
    for _ in range(calls):
        fn(arg)
    return (time.perf_counter() - start) / calls * 1e6


def others_cores(seconds: float) -> float:
    """Cores of this process's CPUs that other processes kept busy over the next ``seconds``."""
    cpus = os.sched_getaffinity(0)
    busy, own, start = cpus_busy_s(cpus), time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, cpus_busy_s(cpus) - busy - (time.process_time() - own)) / (time.perf_counter() - start)


def wait_quiet(limit_s: float, window_s: float = 0.25) -> float:
    """Wait (at most ``limit_s``) until other processes keep less than ``MAX_OTHERS`` core of this
    process's CPUs busy over ``window_s``; returns the seconds waited. The other helpers' timings and
    builds come and go in seconds: a 2-thread sample taken beside them measures them, not the pool."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s and others_cores(window_s) > MAX_OTHERS:
        pass
    return time.perf_counter() - start


def thread_times() -> dict[int, tuple[float, float, int]]:
    """(ms on a CPU, ms waiting on a run queue, the CPU it last ran on) so far of each thread of this
    process (``schedstat``, ``stat``)."""
    times = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            run_ns, wait_ns, _ = Path(task, "schedstat").read_text().split()
            cpu = int(Path(task, "stat").read_text().rsplit(")", 1)[1].split()[36])
        except (OSError, ValueError, IndexError):
            continue
        times[int(task.name)] = (int(run_ns) / 1e6, int(wait_ns) / 1e6, cpu)
    return times


def sample(model, inputs: dict[str, np.ndarray], runs: int, region) -> dict:
    """``runs`` inferences timed one by one, then ``runs`` with per-kernel times; the CPU other
    processes took from this process's CPUs meanwhile (cores) and this process's context switches."""
    region_cost = region_us(region)  # the pool's fork/join just before: does it follow the samples' spread?
    cpus = os.sched_getaffinity(0)
    main = model.vm["main"]
    args = [tvm.runtime.tensor(a) for a in check_inputs(model, inputs)]
    main(*args)
    before = thread_times()
    usage, busy, own, start = resource.getrusage(resource.RUSAGE_SELF), cpus_busy_s(cpus), time.process_time(), time.perf_counter()
    whole = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        main(*args)
        whole.append((time.perf_counter_ns() - t0) / 1e6)
    kernels = kernel_runs(model, inputs, runs, warmup=0)
    wall = time.perf_counter() - start
    after, ran = resource.getrusage(resource.RUSAGE_SELF), thread_times()
    busy_threads = {tid: (run - before[tid][0], wait - before[tid][1], cpu) for tid, (run, wait, cpu) in ran.items()
                    if tid in before and run - before[tid][0] > 0.1}
    return {"region_us": region_cost, "threads": {tid: {"run_ms": r, "wait_ms": w, "cpu": c} for tid, (r, w, c) in busy_threads.items()},
            "wall_ms": wall * 1e3, "whole_ms": whole, "kernels": {k.kernel: list(k.ms) for k in kernels},
            "others": max(0.0, cpus_busy_s(cpus) - busy - (time.process_time() - own)) / wall,
            "voluntary_switches": after.ru_nvcsw - usage.ru_nvcsw,
            "involuntary_switches": after.ru_nivcsw - usage.ru_nivcsw}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summary(samples: dict[int, list[dict]], regions: dict[str, int], calls: dict[str, int]) -> list[dict]:
    """One row per kernel (and the whole model): min, p10 and median at each count, scaling, loss."""
    one, two = (min(samples), max(samples))
    names = list(samples[one][0]["kernels"])
    rows = []
    for name in [*names, "whole model"]:
        row = {"kernel": name, "calls": calls.get(name, 1), "regions": regions.get(name, 0)}  # regions per call
        for threads in (one, two):
            if name == "whole model":
                values = [ms for s in samples[threads] for ms in s["whole_ms"]]
            else:
                values = [ms for s in samples[threads] for ms in s["kernels"].get(name, [])]
            row[threads] = {"min": min(values), "p10": percentile(values, 10), "median": statistics.median(values)}
        for stat in ("min", "p10", "median"):
            row[f"scaling_{stat}"] = row[one][stat] / row[two][stat]
            row[f"loss_{stat}"] = row[two][stat] - row[one][stat] * one / two
        rows.append(row)
    kernels = rows[:-1]
    for stat in ("min", "p10", "median"):
        total = sum(r[f"loss_{stat}"] for r in kernels) or 1.0
        for r in kernels:
            r[f"share_{stat}"] = r[f"loss_{stat}"] / total
    return rows


def print_table(rows: list[dict], one: int, two: int) -> None:
    print(f"| kernel | calls | regions per call | {one}t min ms | {one}t median | {two}t min ms | {two}t p10 | {two}t median | "
          "scaling (min) | scaling (median) | loss (p10) µs | share of loss (p10) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows[:-1], key=lambda r: -r[one]["min"]) + rows[-1:]:
        share = f"{r['share_p10']:.0%}" if "share_p10" in r else ""
        print(f"| {r['kernel'][:44]} | {r['calls']} | {r['regions']} | {r[one]['min']:.4f} | {r[one]['median']:.4f} | {r[two]['min']:.4f} | "
              f"{r[two]['p10']:.4f} | {r[two]['median']:.4f} | {r['scaling_min']:.2f}x | {r['scaling_median']:.2f}x | "
              f"{r['loss_p10'] * 1e3:.0f} | {share} |")
    kernels = rows[:-1]
    for stat in ("min", "p10", "median"):
        summed = {t: sum(r[t][stat] for r in kernels) for t in (one, two)}
        print(f"kernels summed ({stat} each): {summed[one]:.3f} -> {summed[two]:.3f} ms, {summed[one] / summed[two]:.2f}x")


def settings_worker(library: str) -> None:
    """``--worker``: load ``library``; for each line (a run count) on stdin, one :func:`sample` as a JSON line."""
    model, region = tvm_patdnn.load(library), empty_region(tvm.runtime.num_threads())
    inputs = seeded_inputs(model)
    sample(model, inputs, 5, region)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(sample(model, inputs, int(line), region)), flush=True)


def process_cpu_ms(pid: int) -> float:
    """ms the threads of process ``pid`` have run so far (``schedstat``: ns, unlike ``stat``'s ticks)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            total += int(Path(task, "schedstat").read_text().split()[0]) / 1e6
    return total


def wait_asleep(pid: int, window_s: float = 0.02, limit_s: float = 2.0) -> None:
    """Wait until process ``pid`` runs under 5% of a core (its pool stops spinning after a sample)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        before = process_cpu_ms(pid)
        time.sleep(window_s)
        if process_cpu_ms(pid) - before < 0.05 * window_s * 1e3:
            return


def compare_settings(settings: dict[str, dict[str, str]], model, rounds: int, runs: int) -> dict[str, list[dict]]:
    """Samples of the exported ``model`` in one process per setting (environment variables TVM's
    pool reads when it starts: ``TVM_BIND_THREADS``, ``TVM_THREAD_POOL_SPIN_COUNT``...), the
    processes taking turns, each sample after the previous process's pool went to sleep."""
    samples: dict[str, list[dict]] = {label: [] for label in settings}
    with tempfile.TemporaryDirectory() as tmp:
        library = model.export_library(Path(tmp) / "model.so")
        workers = {label: subprocess.Popen([sys.executable, "-m", "benchmarks.threads", "--worker", str(library)],
                                           env={**os.environ, **env}, cwd=Path(__file__).parents[1],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for label, env in settings.items()}
        try:
            for label, worker in workers.items():
                if worker.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"the worker of setting {label!r} did not start")
                wait_asleep(worker.pid)
            order = list(settings)
            for round_ in range(rounds):
                for label in order[round_ % len(order):] + order[:round_ % len(order)]:
                    worker = workers[label]
                    worker.stdin.write(f"{runs}\n")
                    worker.stdin.flush()
                    samples[label].append(json.loads(worker.stdout.readline()))
                    wait_asleep(worker.pid)
                    s = samples[label][-1]
                    print(f"round {round_} {label}: min {min(s['whole_ms']):.3f} median {statistics.median(s['whole_ms']):.3f} "
                          f"ms, others {s['others']:.2f} cores, empty region {s['region_us']:.2f} µs, threads on CPUs "
                          f"{sorted(t['cpu'] for t in s['threads'].values())}", flush=True)
        finally:
            for worker in workers.values():
                worker.stdin.close()
                worker.wait()
    print("| setting | samples | min ms | p10 | p25 | median | p90 | others (median cores) | empty region µs (median) | "
          "samples with its threads on one CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, runs_ in samples.items():
        ms = [m for s in runs_ for m in s["whole_ms"]]
        shared = sum(len({t["cpu"] for t in s["threads"].values()}) < len(s["threads"]) for s in runs_)
        print(f"| {label} | {len(runs_)} | {min(ms):.3f} | {percentile(ms, 10):.3f} | {percentile(ms, 25):.3f} | "
              f"{statistics.median(ms):.3f} | {percentile(ms, 90):.3f} | "
              f"{statistics.median(s['others'] for s in runs_):.2f} | "
              f"{statistics.median(s['region_us'] for s in runs_):.2f} | {shared} |")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pruned ONNX model (default: the benchmarks' VGG-16 CIFAR 8x)")
    parser.add_argument("--rounds", type=int, default=20, help="samples per thread count, alternating")
    parser.add_argument("--runs", type=int, default=20, help="inferences per sample (timed whole and per kernel)")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait for a quiet box before a sample")
    parser.add_argument("--one-thread", action="store_true",
                        help="run the multi-thread build on one thread too: what parallel code costs per thread")
    parser.add_argument("--json", type=Path, help="write the rows and every sample here")
    parser.add_argument("--settings", nargs="+", metavar="LABEL:VAR=VALUE,...",
                        help="instead, the whole model at TVM_NUM_THREADS threads under each pool setting, one process each")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        settings_worker(args.worker)
        return
    if args.settings:
        settings = {label: dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
                    for label, _, pairs in (spec.partition(":") for spec in args.settings)}
        model = tvm_patdnn.compile(args.model or twins("vgg16_cifar").pruned, "x86", tuning_db=False,
                                   threads=tvm.runtime.num_threads())
        samples = compare_settings(settings, model, args.rounds, args.runs)
        if args.json:
            args.json.write_text(json.dumps({"settings": settings, "samples": samples}, indent=1))
        return
    counts = (1, tvm.runtime.num_threads())
    if counts[1] < 2:
        raise SystemExit("run with TVM_NUM_THREADS >= 2 (the pool only shrinks)")
    onnx_model = args.model or twins("vgg16_cifar").pruned
    models = {n: tvm_patdnn.compile(onnx_model, "x86", tuning_db=False, threads=n) for n in counts}
    inputs = seeded_inputs(models[1])
    reference = models[1].run(inputs)[0]
    for n in counts:
        resize_pool(n)
        np.testing.assert_allclose(models[n].run(inputs)[0], reference, rtol=1e-3, atol=1e-4)
    regions = parallel_regions(models[counts[1]])
    region = empty_region(counts[1])
    calls = {k.kernel: k.calls for k in kernel_runs(models[counts[1]], inputs, 1, 0)}
    print(f"{sum(regions.get(name, 0) * n for name, n in calls.items())} parallel regions per inference in the "
          f"{counts[1]}-thread build")
    samples: dict[int, list[dict]] = {n: [] for n in counts}
    settle()
    for round_ in range(args.rounds):
        for n in counts if round_ % 2 == 0 else counts[::-1]:
            resize_pool(1 if args.one_thread else n)
            waited = wait_quiet(args.wait)
            samples[n].append({**sample(models[n], inputs, args.runs, region), "waited_s": waited})
            s = samples[n][-1]
            print(f"round {round_} {n}t: min {min(s['whole_ms']):.3f} median {statistics.median(s['whole_ms']):.3f} ms, "
                  f"others {s['others']:.2f} cores (waited {waited:.1f} s), empty region {s['region_us']:.2f} µs, switches "
                  f"{s['voluntary_switches']}/{s['involuntary_switches']}; threads run/queued ms "
                  + " ".join(f"{t['run_ms']:.0f}/{t['wait_ms']:.1f} (cpu {t['cpu']})" for t in s["threads"].values())
                  + f" of {s['wall_ms']:.0f}", flush=True)
    quiet = {n: [s for s in samples[n] if s["others"] <= MAX_OTHERS] for n in counts}
    kept = quiet if all(quiet.values()) else samples
    print(f"samples with other processes under {MAX_OTHERS} core: "
          + ", ".join(f"{len(quiet[n])} of {len(samples[n])} at {n}t" for n in counts)
          + ("; the table uses those" if kept is quiet else "; too few: the table uses all"))
    rows = summary(kept, regions, calls)
    print_table(rows, *counts)
    for n in counts:
        cost = [s["region_us"] for s in kept[n]]
        print(f"one empty parallel region at {n} thread(s): min {min(cost):.2f} µs, median {statistics.median(cost):.2f} µs")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "samples": samples, "regions": regions}, indent=1, default=str))


if __name__ == "__main__":
    main()
