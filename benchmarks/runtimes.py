"""How the benchmarks run and time each runtime, and how they check that outputs agree.

TVM modules are timed with TVM's ``time_evaluator`` (:func:`time_ms`) or in process CPU time
(:func:`cpu_ms`); the peers (ONNX Runtime, MNN, PyTorch) are wrapped as callables timed over at
least ``MIN_SAMPLE_MS`` of repetitions. Every benchmark checks outputs (:func:`agree`) before it
times anything.
"""

from __future__ import annotations

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


def ort_runner(model: onnx.ModelProto, x: np.ndarray, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
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


def agree(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return float(np.abs(actual.reshape(expected.shape) - expected).max() / max(np.abs(expected).max(), 1e-30))
