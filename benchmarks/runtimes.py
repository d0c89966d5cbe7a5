"""How the benchmarks run and time each runtime, and how they check that outputs agree.

TVM modules are timed with TVM's ``time_evaluator`` (:func:`time_ms`) or in process CPU time
(:func:`cpu_ms`); the peers (ONNX Runtime, MNN, PyTorch) are wrapped as callables timed over at
least ``MIN_SAMPLE_MS`` of repetitions. Every benchmark checks outputs (:func:`agree`) before it
times anything. Runtimes sharing one process are timed with :func:`quiet_sample`, which waits out the
threads a runtime leaves spinning after its run before the next one starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

from .models import torch_module_with

MIN_SAMPLE_MS = 200.0
# A sample during which other processes took more than this many cores of the benchmark's CPUs is disturbed.
MAX_OTHERS = 0.1


def vm_of(executable) -> relax.VirtualMachine:
    return relax.VirtualMachine(executable, tvm.cpu())


def time_ms(vm: relax.VirtualMachine, x: tvm.runtime.Tensor, number: int) -> float:
    vm.set_input("main", x)
    evaluator = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=number, repeat=1, min_repeat_ms=200)
    return evaluator("main").mean * 1e3


def cpu_ms(fn, call_args, min_ms: float = 40.0) -> float:
    """Mean process CPU time of one call, over calls adding up to at least ``min_ms``: with one TVM
    thread the calls run on this thread, and a second process sharing the core disturbs CPU time
    far less than wall time (it halved wall-clock rates on the session-5 box). Not for more threads."""
    calls, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) * 1e3 < min_ms or calls < 3:
        fn(*call_args)
        calls += 1
    return elapsed * 1e3 / calls


def rotated_rounds(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """ms of every timer (a call returning one sample's ms) in each of ``rounds`` interleaved rounds,
    each round starting one timer later: the shared box's load changes between rounds more than
    within one, and a fixed order makes whichever runs first pay for its place (session 7)."""
    order, samples = list(timers), {label: [] for label in timers}
    for round_ in range(rounds):
        for label in order[round_ % len(order):] + order[:round_ % len(order)]:
            samples[label].append(timers[label]())
    return samples


def sample_ms(run: Callable[[], object]) -> float:
    """Mean ms of ``run`` over at least MIN_SAMPLE_MS of repetitions."""
    count, start = 0, time.perf_counter()
    while (elapsed := (time.perf_counter() - start) * 1e3) < MIN_SAMPLE_MS or count == 0:
        run()
        count += 1
    return elapsed / count


@dataclass(frozen=True)
class Runner:
    """One runtime running one model: ``output()`` its output, ``time()`` the ms of one run."""

    output: Callable[[], np.ndarray]
    time: Callable[[], float]


def fn_runner(run: Callable[[], np.ndarray]) -> Runner:
    """Any runtime given as a zero-argument callable returning the output, timed by :func:`sample_ms`."""
    return Runner(lambda: np.asarray(run()), lambda: sample_ms(run))


def tvm_runner(executable, x: np.ndarray) -> Runner:
    """A compiled tvm_patdnn/TVM model (its executable), timed with TVM's time_evaluator (:func:`time_ms`)."""
    vm, tx = vm_of(executable), tvm.runtime.tensor(x)
    return Runner(lambda: vm["main"](tx).numpy(), lambda: time_ms(vm, tx, number=1))


def ort_session(model: onnx.ModelProto, threads: int, profile_prefix: str | None = None):
    """ONNX Runtime's CPU session as every benchmark runs it: all graph optimisations, ``threads``
    intra-op threads, sequential; with ``profile_prefix``, its per-node profiler on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_runner(model: onnx.ModelProto, x: np.ndarray, threads: int) -> Runner:
    session = ort_session(model, threads)
    feed = {session.get_inputs()[0].name: x}
    return fn_runner(lambda: session.run(None, feed)[0])


def mnn_convert(onnx_path: Path, mnn_path: Path) -> None:
    """ONNX -> MNN with MNN's converter extension called directly (the `mnnconvert` command and
    MNN.tools import a logger that pip-installs an SDK and sends usage logs)."""
    import _tools  # MNN's converter, shipped by the PyPI MNN wheel

    _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(mnn_path), "--bizCode", "MNN"])
    if not mnn_path.exists():
        raise RuntimeError(f"MNN conversion of {onnx_path} failed")


def mnn_runner(mnn_path: Path, x: np.ndarray, threads: int) -> Runner:
    import MNN

    interpreter = MNN.Interpreter(str(mnn_path))
    session = interpreter.createSession({"numThread": threads, "precision": "normal", "backend": "CPU"})
    source = interpreter.getSessionInput(session)
    source.copyFrom(MNN.Tensor(x.shape, MNN.Halide_Type_Float, x, MNN.Tensor_DimensionType_Caffe))
    sink = interpreter.getSessionOutput(session)

    def run() -> np.ndarray:
        interpreter.runSession(session)
        host = MNN.Tensor(sink.getShape(), MNN.Halide_Type_Float, np.zeros(sink.getShape(), np.float32), MNN.Tensor_DimensionType_Caffe)
        sink.copyToHostTensor(host)
        return np.array(host.getData(), np.float32).reshape(sink.getShape())

    return fn_runner(run)


def torch_runner(name: str, model: onnx.ModelProto, x: np.ndarray, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)
    module, tx = torch_module_with(name, model), torch.from_numpy(x)

    def run() -> np.ndarray:
        with torch.inference_mode():
            return module(tx).numpy()

    return fn_runner(run)


def cpus_busy_s(cpus: set[int]) -> float:
    """CPU seconds the CPUs ``cpus`` have spent busy so far (``/proc/stat``: user, nice, system, irq,
    softirq and steal time; 0 where there is no ``/proc``). Niced work counts: with a nice-19
    training on the other core (and under 0.1 core of anything else), 2-thread VGG-16 CIFAR took
    ORT 23.6 ms and PyTorch 300 ms, against 6.9 and 23 on an idle box."""
    try:
        with open("/proc/stat") as stat:
            rows = [line.split() for line in stat if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return 0.0
    busy = 0
    for row in rows:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in row[1:9])
        busy += user + nice + system + irq + softirq + steal if int(row[0][3:]) in cpus else 0
    return busy / os.sysconf("SC_CLK_TCK")


def settle(window_s: float = 0.02, limit_s: float = 2.0) -> float:
    """Wait until no thread of this process runs (under 5% of one core over ``window_s``), at most
    ``limit_s``; returns the seconds waited.

    Thread pools keep spinning after a run, so that the next run starts without waking them: at 2
    threads on the Zen 3 VM, TVM's pool worker spun (``sched_yield``, ``TVM_THREAD_POOL_SPIN_COUNT``
    300000) for 0.3-0.7 s after the last kernel, ORT's intra-op pool 0.04-0.1 s, PyTorch's and
    MNN's OpenMP teams under 0.05 s. A runtime timed right after shared the two cores with them:
    another runtime's thread took up to 37 ms of CPU during a 250 ms sample, none after a settle."""
    start = time.perf_counter()
    while (waited := time.perf_counter() - start) < limit_s:
        cpu = time.process_time()
        time.sleep(window_s)
        if time.process_time() - cpu < 0.05 * window_s:
            break
    return waited


@dataclass(frozen=True)
class Sample:
    """One timed sample: ``ms`` per run, the CPU that other processes took from this process's CPUs
    meanwhile (``others``, in cores), how long this process's threads kept running after it
    (``spin_s``) and how many samples were taken to get it (``attempts``)."""

    ms: float
    others: float
    spin_s: float
    attempts: int


def quiet_sample(runner: Runner, max_others: float = MAX_OTHERS, attempts: int = 3) -> Sample:
    """A sample of ``runner`` that starts and ends with this process quiet (:func:`settle` after it;
    call :func:`settle` once before the first), so that every runtime in the process is timed with
    the others' threads asleep. A sample during which other processes took more than ``max_others``
    cores of this process's CPUs is taken again, up to ``attempts`` in all; the least disturbed is kept.
    At N threads on N cores anything else running stalls every parallel step: at 2 threads with one
    core busy elsewhere, PyTorch's VGG-16 CIFAR took 290 ms instead of 23."""
    cpus = os.sched_getaffinity(0)
    best = None
    for attempt in range(1, attempts + 1):
        busy, own, start = cpus_busy_s(cpus), time.process_time(), time.perf_counter()
        ms = runner.time()
        wall = time.perf_counter() - start
        others = max(0.0, (cpus_busy_s(cpus) - busy) - (time.process_time() - own)) / wall
        sample = Sample(ms, others, settle(), attempt)
        best = sample if best is None or sample.others < best.others else best
        if others <= max_others:
            break
    return Sample(best.ms, best.others, best.spin_s, attempt)


def agree(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return float(np.abs(actual.reshape(expected.shape) - expected).max() / max(np.abs(expected).max(), 1e-30))
