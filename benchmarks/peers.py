"""tvm_patdnn against its peers on whole models, batch 1 fp32, measured side by side in one run.

Models (``--models``, built by ``models.py`` as dense and pruned twins): VGG-16 for CIFAR (32x32,
no BN; the model the records shipped in ``tvm_patdnn/schedules/`` were tuned for), VGG-16 ImageNet
(224x224; ``vgg16_trunk``: its 13 convs and 5 pools without the classifier), ResNet-50 ImageNet (BN folded into the convs) with random He-normal weights from a fixed
seed (no pretrained weights can be downloaded here), and MobileNetV2 with its real ImageNet weights.
Each is pruned one-shot by the project's pruning core (``prune_onnx(model, n_patterns=8,
connectivity=3.6)``: 8 magnitude-chosen patterns, 3.6x connectivity, first conv dense; with
``--pointwise RATE`` the 1x1 convs too, in (4, 1) blocks) and run, on the same pruned weights, by
(MobileNetV2 without ``--pointwise`` has nothing to prune, its 3x3s being depthwise: every column runs
the unpruned model, its rows say so, and tvm_patdnn is then our dense path against the peers)

- tvm_patdnn with the shipped schedules (``compile(pruned, "x86")``) and with default schedules only
  (``tuning_db=False``); with ``--tune-trials N`` also tuned for N trials (``--tune-trials 0``:
  only the dense kernels chosen per layer by measurement, and every kernel's default measured);
- TVM dense: the *unpruned* model on TVM's dense path with our default dense schedule rule
  (``compile(dense, "x86", tuning_db=False)``), tuned with the same N trials when asked;
- ONNX Runtime, MNN (session API) and PyTorch (eager, the pruned weights loaded into the module).

Every runtime's output is checked against ``onnx.reference`` (CIFAR) or ONNX Runtime (ImageNet
models: the reference interpreter is too slow there), relative 1e-3, before anything is timed.
``runtime.config_threadpool`` does not change TVM's thread count in apache-tvm 0.27 (measured:
CPU time / wall time stays 1.0), so each thread count runs in its own worker process with
``TVM_NUM_THREADS``/``OMP_NUM_THREADS`` set, on the last N CPUs the command may use (1 thread: one
core); ORT, MNN and PyTorch get the count through their APIs. Every runtime keeps its default wait
policy (TVM's pool and ORT's intra-op pool spin, PyTorch's and MNN's OpenMP teams spin briefly), so
runtimes are timed in interleaved rounds (the box is shared), each sample starting only once the
threads the previous runtime left spinning have gone to sleep (``runtimes.quiet_sample``: at 2
threads they took the second core for up to 0.7 s), and medians are reported. A sample during which
other processes took more than 0.1 core of the benchmark's CPUs is taken again (at most 3 times;
the least disturbed is kept), and what they took is reported.
Per-layer table: every conv of VGG-16 CIFAR compiled alone (``models.conv3x3_model``), against the
FMA peak measured at run time with the widest FMA the host has (``machine.py``: 512-bit on
AVX-512 hosts, 256-bit on AVX2, NEON on aarch64); the ISA is named in the output.

    .venv/bin/python -m benchmarks.peers [--models vgg16_cifar vgg16 vgg16_trunk resnet50 mobilenet_v2] [--threads 1 2]
        [--rounds 5] [--tune-trials 0] [--pointwise RATE] [--json benchmarks/results/peers.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import tvm_patdnn
from tvm_patdnn.fileio import save_model_atomic, write_bytes_atomic
from tvm_patdnn.targets import resolve_target

from .machine import cpu_name, fma_peak_gflops, widest_isa
from .models import INPUT_SHAPES, conv3x3_model, twins
from .runtimes import MAX_OTHERS, Runner, Sample, agree, mnn_convert, mnn_runner, ort_runner, quiet_sample, settle, torch_runner, tvm_runner

RESULTS = Path(__file__).parent / "results"
TITLES = {"vgg16_cifar": "VGG-16 CIFAR 32x32", "vgg16": "VGG-16 ImageNet 224x224",
          "vgg16_trunk": "VGG-16 224x224 conv trunk (no classifier)", "resnet50": "ResNet-50 ImageNet 224x224",
          "mobilenet_v2": "MobileNetV2 ImageNet 224x224"}
RTOL = 1e-3

# ----------------------------------------------------------------------------- worker (one thread count)


def compile_variants(dense: onnx.ModelProto, pruned: onnx.ModelProto, dbs: dict[str, str]) -> dict[str, tvm_patdnn.CompiledModel]:
    variants = {
        "tvm_patdnn": tvm_patdnn.compile(pruned, "x86"),
        "tvm_patdnn untuned": tvm_patdnn.compile(pruned, "x86", tuning_db=False),
        "TVM dense": tvm_patdnn.compile(dense, "x86", tuning_db=False),
    }
    if dbs:
        variants["tvm_patdnn tuned"] = tvm_patdnn.compile(pruned, "x86", tuning_db=dbs["pattern"])
        variants["TVM dense tuned"] = tvm_patdnn.compile(dense, "x86", tuning_db=dbs["dense"])
    return variants


def worker_model(name: str, threads: int, rounds: int, workdir: Path, dbs: dict[str, str]) -> dict:
    """Check agreement, then time every runtime on model ``name`` in interleaved rounds."""
    dense, pruned = onnx.load(str(workdir / f"{name}.dense.onnx")), onnx.load(str(workdir / f"{name}.pruned.onnx"))
    x = np.random.default_rng(0).standard_normal(INPUT_SHAPES[name]).astype(np.float32)
    compiled = compile_variants(dense, pruned, dbs)
    runners: dict[str, Runner] = {key: tvm_runner(c.executable, x) for key, c in compiled.items()}
    runners["ONNX Runtime"] = ort_runner(pruned, x, threads)
    runners["MNN"] = mnn_runner(workdir / f"{name}.pruned.mnn", x, threads)
    runners["PyTorch"] = torch_runner(name, pruned, x, threads)

    # Agreement first: pruned-model runtimes against the pruned reference, TVM dense against the dense one.
    if name == "vgg16_cifar":
        from onnx.reference import ReferenceEvaluator

        ref_pruned = ReferenceEvaluator(pruned).run(None, {"input": x})[0]
        ref_dense = ReferenceEvaluator(dense).run(None, {"input": x})[0]
        reference = "onnx.reference"
    else:
        ref_pruned = runners["ONNX Runtime"].output()
        ref_dense = ort_runner(dense, x, threads).output()
        reference = "ONNX Runtime"
    errors = {key: agree(r.output(), ref_dense if key.startswith("TVM dense") else ref_pruned) for key, r in runners.items()}
    bad = {key: e for key, e in errors.items() if e > RTOL}
    if bad:
        raise RuntimeError(f"{name}: outputs disagree with {reference} (relative max error): {bad}")

    samples: dict[str, list[Sample]] = {key: [] for key in runners}
    for key, runner in runners.items():  # warm-up
        runner.time()
    settle()
    # The order rotates every round: whichever runtime runs first in a round after another one (PyTorch
    # last) measured 1.10-1.15x slower than an identical library run second (ResNet-50, 2026-12-06).
    # Each sample starts with every other runtime's threads asleep (quiet_sample waits out the spin).
    order = list(runners)
    for round_ in range(rounds):
        shift = round_ % len(order)
        for key in order[shift:] + order[:shift]:
            samples[key].append(quiet_sample(runners[key]))
    report = compiled["tvm_patdnn"].report
    return {
        "model": name, "threads": threads, "rounds": rounds, "reference": reference, "rel_error": errors,
        "median_ms": {key: statistics.median(s.ms for s in v) for key, v in samples.items()},
        "samples_ms": {key: [s.ms for s in v] for key, v in samples.items()},
        "others_cores": {key: [round(s.others, 3) for s in v] for key, v in samples.items()},
        "spin_after_s": {key: [round(s.spin_s, 3) for s in v] for key, v in samples.items()},
        "attempts": {key: [s.attempts for s in v] for key, v in samples.items()},
        "dense_gflop": sum(r.dense_flops for r in report) / 1e9, "nonzero_gflop": sum(r.nonzero_flops for r in report) / 1e9,
        "pattern_convs": sum(r.kind == "pattern" for r in report), "convs": len(report),
    }


def worker_layers(threads: int, rounds: int, workdir: Path) -> list[dict]:
    """Every conv of the pruned VGG-16 CIFAR compiled alone (conv + bias + ReLU), timed interleaved."""
    pruned = onnx.load(str(workdir / "vgg16_cifar.pruned.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    records = tvm_patdnn.compile(pruned, "x86").report
    layers = []
    for record in records:
        weight = inits[f"{record.name}.weight"] if f"{record.name}.weight" in inits else None
        assert weight is not None and tuple(weight.shape) == tuple(record.weight_shape), record.name
        size = record.data_shape[-1]
        single = tvm_patdnn.compile(conv3x3_model(weight, size), "x86")
        x = np.random.default_rng(0).standard_normal(record.data_shape).astype(np.float32)
        layers.append((record, tvm_runner(single.executable, x)))
    samples: list[list[float]] = [[] for _ in layers]
    for _ in range(rounds):
        for index, (_, runner) in enumerate(layers):
            samples[index].append(runner.time())
    rows = []
    for (record, _), values in zip(layers, samples):
        ms = statistics.median(values)
        rows.append({"layer": record.name, "kind": record.kind, "threads": threads, "shape": f"{record.weight_shape[0]}x{record.weight_shape[1]} {record.data_shape[-1]}x{record.data_shape[-1]}",
                     "density": record.density, "ms": ms, "dense_gflop": record.dense_flops / 1e9, "nonzero_gflop": record.nonzero_flops / 1e9,
                     "dense_gflops": record.dense_flops / ms / 1e6, "nonzero_gflops": record.nonzero_flops / ms / 1e6})
    return rows


def worker(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    dbs = json.loads(args.dbs)
    out = {"threads": args.threads, "target": str(resolve_target("x86")), "fma_peak_gflops": fma_peak_gflops(args.threads, workdir), "models": [], "layers": []}
    for name in args.models:
        print(f"[{args.threads} thread(s)] {name} ...", file=sys.stderr, flush=True)
        try:
            out["models"].append(worker_model(name, args.threads, args.rounds if name == "vgg16_cifar" else max(3, args.rounds - 2), workdir, dbs.get(name, {})))
        except Exception as err:  # keep the other models' results; the error goes into the JSON
            print(f"[{args.threads} thread(s)] {name} failed: {err!r}", file=sys.stderr, flush=True)
            out.setdefault("errors", []).append({"model": name, "threads": args.threads, "error": repr(err)})
        partial = workdir / f"worker{args.threads}.json"
        write_bytes_atomic(partial, json.dumps(out).encode())
    if "vgg16_cifar" in args.models and not args.no_layers:
        print(f"[{args.threads} thread(s)] per-layer table ...", file=sys.stderr, flush=True)
        out["layers"] = worker_layers(args.threads, args.rounds, workdir)
    out["fma_peak_gflops_after"] = fma_peak_gflops(args.threads, workdir)
    write_bytes_atomic(workdir / f"worker{args.threads}.json", json.dumps(out).encode())


# ----------------------------------------------------------------------------- report


PEERS = ["TVM dense", "ONNX Runtime", "MNN", "PyTorch"]


def markdown(result: dict) -> str:
    lines = ["| model | threads | tvm_patdnn ms | untuned ms | TVM dense ms | ORT ms | MNN ms | PyTorch ms "
             "| vs TVM dense | vs ORT | vs MNN | vs PyTorch |", "|" + "---|" * 12]
    tuned = any("tvm_patdnn tuned" in row["median_ms"] for row in result["rows"])
    if tuned:
        lines[0] += " tuned ms | TVM dense tuned ms | tuned vs dense tuned |"
        lines[1] += "---|" * 3
    for row in result["rows"]:
        m = row["median_ms"]
        ours = m["tvm_patdnn"]
        title = TITLES[row["model"]] + (" (unpruned: nothing to prune)" if row["model"] in result.get("notes", {}) else "")
        cells = [title, str(row["threads"]), f"{ours:.2f}", f"{m['tvm_patdnn untuned']:.2f}"]
        cells += [f"{m[peer]:.2f}" for peer in PEERS] + [f"{m[peer] / ours:.2f}x" for peer in PEERS]
        if tuned:
            cells += [f"{m['tvm_patdnn tuned']:.2f}", f"{m['TVM dense tuned']:.2f}", f"{m['TVM dense tuned'] / m['tvm_patdnn tuned']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    if result["layers"]:
        lines += ["", f"| layer | kind | weight, input | threads | ms | dense GFLOP/s | nonzero GFLOP/s | nonzero % of {result['meta'].get('fma_isa', 'avx2')} FMA peak |", "|" + "---|" * 8]
        for row in result["layers"]:
            peak = result["fma_peak_gflops"][str(row["threads"])]
            lines.append(f"| {row['layer']} | {row['kind']} | {row['shape']} | {row['threads']} | {row['ms']:.3f} | {row['dense_gflops']:.1f} "
                         f"| {row['nonzero_gflops']:.1f} | {100 * row['nonzero_gflops'] / peak:.0f}% |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in result["rows"]))
    runtimes = ["tvm_patdnn", "tvm_patdnn untuned", *PEERS]
    runtimes += [key for key in ("tvm_patdnn tuned", "TVM dense tuned") if key in result["rows"][0]["median_ms"]]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [row for row in result["rows"] if row["model"] == model]
        width = 0.8 / len(runtimes)
        for index, runtime in enumerate(runtimes):
            xs = [i + (index - (len(runtimes) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [row["median_ms"][runtime] for row in rows], width, label=runtime)
        ax.set_xticks(range(len(rows)), [f"{row['threads']} thread(s)" for row in rows])
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(f"{TITLES[model]}, " + ("unpruned (nothing to prune)" if model in result.get("notes", {}) else "8x pattern-pruned"))
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(runtimes), 4 * len(models))  # legend rows that fit the figure's width
    legend_rows = -(-len(runtimes) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8)
    fig.suptitle(f"batch 1 fp32, {result['meta']['date']}, {result['meta']['cpu']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.045 * legend_rows + 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(INPUT_SHAPES), default=["vgg16_cifar"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ImageNet models: rounds - 2, at least 3)")
    parser.add_argument("--tune-trials", type=int, help="also tune tvm_patdnn and TVM dense with this many trials each "
                                                          "(0: only choose each dense layer's kernel by measurement)")
    parser.add_argument("--pointwise", type=float, metavar="RATE",
                        help="also prune the 1x1 convs: 1 (4, 1) block in RATE kept (they then run on the sparse kernel)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--json", type=Path, default=RESULTS / "peers.json")
    parser.add_argument("--md", type=Path, default=RESULTS / "peers.md")
    parser.add_argument("--png", type=Path, default=RESULTS / "peers.png")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--dbs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--from-json", type=Path, help="only re-render the markdown and PNG from this JSON")
    args = parser.parse_args()
    if args.from_json:
        render(json.loads(args.from_json.read_text()), args.md, args.png)
        return
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return

    # A worker of N threads runs on the last N CPUs this process may use: 1 thread stays on one core
    # (the timing core, as under `taskset -c 1`) however the command was started.
    allowed = sorted(os.sched_getaffinity(0))
    if max(args.threads) > len(allowed):
        parser.error(f"{max(args.threads)} threads need as many CPUs; this process may use {allowed} (drop the taskset)")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        workdir = Path(tmp)
        dbs: dict[str, dict[str, str]] = {}
        build_errors, models, notes = [], [], {}
        for name in args.models:
            print(f"building {name} ...", file=sys.stderr, flush=True)
            try:
                dense, pruned, note = twins(name, args.pointwise)
            except Exception as err:  # measure the others
                print(f"{name} failed to build: {err!r}", file=sys.stderr, flush=True)
                build_errors.append({"model": name, "threads": "any", "error": repr(err)})
                continue
            models.append(name)
            if note:
                notes[name] = note
                print(f"{name}: {note}", file=sys.stderr, flush=True)
            save_model_atomic(dense, workdir / f"{name}.dense.onnx")
            save_model_atomic(pruned, workdir / f"{name}.pruned.onnx")
            mnn_convert(workdir / f"{name}.pruned.onnx", workdir / f"{name}.pruned.mnn")
            if args.tune_trials is not None:
                dbs[name] = {kind: str(workdir / f"{name}.{kind}.db") for kind in ("pattern", "dense")}
                for kind, model in (("pattern", pruned), ("dense", dense)):
                    tvm_patdnn.tune(model, "x86", trials=args.tune_trials, database=dbs[name][kind], progress=sys.stderr)
        workers = []
        for threads in args.threads:
            env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, "-m", "benchmarks.peers", "--worker", "--workdir", str(workdir), "--threads", str(threads),
                       "--rounds", str(args.rounds), "--dbs", json.dumps(dbs), "--models", *models]
            command += ["--no-layers"] if args.no_layers else []
            cpus = set(allowed[-threads:])
            subprocess.run(command, env=env, check=True, preexec_fn=functools.partial(os.sched_setaffinity, 0, cpus))
            workers.append(json.loads((workdir / f"worker{threads}.json").read_text()))

    import tvm

    result = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "fma_isa": widest_isa(), "target": "; ".join(w["target"] for w in workers),
                 "tvm": tvm.__version__, "command": " ".join(["-m benchmarks.peers", *sys.argv[1:]]), "tune_trials": args.tune_trials,
                 "wall_s": round(time.time() - started), "load_average": os.getloadavg(),
                 "weights": "random He-normal from a fixed seed (no pretrained weights are available offline); "
                            f"pruned with prune_onnx(n_patterns=8, connectivity=3.6, pointwise={args.pointwise}), "
                            "first conv dense" + ("; MobileNetV2: its real ImageNet weights" if "mobilenet_v2" in models else "")},
        "notes": notes,
        "fma_peak_gflops": {str(w["threads"]): w["fma_peak_gflops"] for w in workers},
        "fma_peak_gflops_after": {str(w["threads"]): w["fma_peak_gflops_after"] for w in workers},
        "rows": [row for w in workers for row in w["models"]],
        "layers": [row for w in workers for row in w["layers"]],
        "errors": build_errors + [error for w in workers for error in w.get("errors", [])],
    }
    write_bytes_atomic(args.json, json.dumps(result, indent=2).encode())
    render(result, args.md, args.png)
    print(f"results in {args.json}, {args.md}, {args.png}")


def disturbance(row: dict) -> str:
    """What shared the CPUs with a row's samples: other processes, and each runtime's spinning
    threads (waited out before the next sample)."""
    others = [value for values in row["others_cores"].values() for value in values]
    retaken = sum(value > 1 for values in row["attempts"].values() for value in values)
    disturbed = sum(value > MAX_OTHERS for value in others)
    spins = ", ".join(f"{key} {statistics.median(values):.2f} s" for key, values in row["spin_after_s"].items())
    return (f"{TITLES[row['model']]}, {row['threads']} thread(s): other processes took {statistics.median(others):.2f} "
            f"cores of the benchmark's CPUs during a median sample (at most {max(others):.2f}); {retaken} of {len(others)} "
            f"samples were taken again for it, {disturbed} stayed above {MAX_OTHERS} core; threads kept running after "
            f"a sample: {spins}.")


def render(result: dict, md: Path, png: Path) -> None:
    """Write (and print) the markdown tables and draw the PNG chart."""
    table = markdown(result)
    peaks = ", ".join(f"{t} thread(s) {p:.1f}" for t, p in result["fma_peak_gflops"].items())
    text = (f"{table}\n\nMeasured {result['meta']['date']} on {result['meta']['cpu']} ({result['meta']['target']}), "
            f"`.venv/bin/python {result['meta']['command']}`; FMA peak (GFLOP/s, {result['meta'].get('fma_isa', 'avx2')} loop): {peaks}. "
            f"Weights: {result['meta']['weights']}.\n")
    text += "".join(f"\n{disturbance(row)}\n" for row in result["rows"] if "others_cores" in row)
    text += "".join(f"\n{TITLES[model]}: {note}; tvm_patdnn, ORT, MNN and PyTorch run the unpruned model, so "
                    f"tvm_patdnn is our dense path (as TVM dense) against the peers.\n" for model, note in result.get("notes", {}).items())
    text += "".join(f"\nNot measured: {e['model']} at {e['threads']} thread(s): {e['error']}\n" for e in result["errors"])
    write_bytes_atomic(md, text.encode())
    plot(result, png)
    print(text)


if __name__ == "__main__":
    main()
