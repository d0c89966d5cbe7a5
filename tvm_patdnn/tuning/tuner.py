"""``tvm_patdnn.tune``: meta_schedule over a model's kernels, records appended to a database.

Flow: the model goes through the compiler's passes up to fusion; every distinct PrimFunc is a
task (pattern convs in ``space.py``'s design space, everything else in meta_schedule's space for
the target). Each task is first measured with its default schedule, committed as an ordinary
record (so the best record is never slower than the untuned default, and the progress display
can say how much tuning won), then evolutionary search guided by the XGBoost cost model runs
round robin over the tasks, measuring on this machine (LocalRunner) or on a device behind an
RPC tracker (RPCRunner). Records are appended batch by batch as they are measured; a re-run
with the same database counts what is already there and only measures the remaining trials.

The search's best is the fastest of many one-off measurements on a possibly shared core, so it
overstates (session 11: 1.15-1.56x printed where in-process A/B found 0.83-1.13x, and records
that made two kernels slower in the model). So each task's best candidates are then *verified*:
measured against the default back to back, ``VERIFY_ROUNDS`` rounds in rotated order, cache
flushed, with the same runner (locally or on the device); a candidate is kept only if it wins
by ``KEEP_MARGIN`` both in the median of its per-round default/candidate ratios and between each
one's fastest round, else the task keeps its default. The verdict is appended to the database
(``database.Verification``) and is what ``compile`` applies and what the results report. The
dense layers' kernel choices, each candidate measured once before the search, are verified the
same way (``_compare``) against the rules' choice, their verdicts appended to
``dense_kernels.json`` (``kernel_records.DenseVerdict``).

Failed trials (a candidate that does not build or run) are counted per task and reported with
their error. A device that cannot be reached (no session from the tracker within ``timeout``)
ends the tune at once, as do ``MAX_FAILED_BATCHES`` batches in a row in which every trial
failed; the results then say why (``TuneResults.stopped``) and the database keeps everything
measured, so the same call resumes once the device is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx
import tvm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import termination
from ..analysis import PatternOptions
from ..errors import PatDNNError
from ..export import linker_for
from ..frontend import load_model
from ..ops.dense_conv import DenseConvSpec
from ..pipeline import default_schedule_rules
from ..rpc import DEVICE_UNAVAILABLE, check_tracker, parse_rpc, request_session
from ..schedule_rules.pattern_conv_cpu import apply_default_schedule
from ..targets import host_arch, is_host_runnable, resolve_target, runtime_threads, target_arch
from ..transform.kernel_choice import KernelChoices
from ..tvm_compat import only_tensor_intrinsics
from ..tvm_noise import filter_tvm_noise
from .database import AppendOnlyDatabase, Verification, open_for_tuning, target_key
from .farm import DeviceFarm, DeviceStats
from .kernel_records import LayerResult, commit_verdict, measure_candidate, to_verify, tune_dense_kernels
from .measure import LibraryExport, PackedArguments, build_kernel, mean_ms, short_error, signature
from .space import pattern_conv_space_generator
from .tasks import Task, extract_tasks
from .threads import (
    LocalThreads,
    check_threads,
    describe,
    for_threads,
    set_remote_threads,
    thread_count,
)

__all__ = ["KEEP_MARGIN", "MAX_FAILED_BATCHES", "VERIFY_CANDIDATES", "VERIFY_ROUNDS", "TaskResult", "TaskState",
           "TuneResults", "tune", "tuning_contexts"]

MAX_FAILED_BATCHES = 3  # batches in a row with every trial failed before the tune gives up
VERIFY_CANDIDATES = 3  # a task's fastest distinct search records re-measured against its default
VERIFY_ROUNDS = 7  # rounds of the verification, each measuring the default and every candidate once
# A candidate is kept only if its verified speedup (``_verified_speedup``) reaches this.
# Identical code measured up to 5-7% apart per kernel on this shared box (session 11's A/B), and a
# kernel timed alone can run a few % differently in the model: a smaller "win" is not worth a
# record that may lose, so a near tie keeps the default (the schedule every other number is about).
KEEP_MARGIN = 1.03
SEARCH_REPEATS = 10  # single runs per search trial (its time: their median)
VERIFY_REPEATS = 15  # single runs per candidate and round of the verification


@dataclass
class TaskResult:
    """How one task stands after tuning (times in ms; None when never measured successfully)."""

    name: str
    kind: str
    weight: int
    trials: int
    default_ms: float | None
    best_ms: float | None
    failed: int = 0  # trials of this tune that failed (default schedule included)
    error: str | None = None  # the last failed trial's error, in one line
    # Verified (``default_ms``/``best_ms`` are then the verification's medians): the best candidate
    # kept (True) or the default (False); None: not verified, the times are the records' own.
    kept: bool | None = None
    candidate_speedup: float | None = None  # the verified candidate's speedup (``_verified_speedup``)
    search_speedup: float | None = None  # what the search alone claimed: its records' default / fastest

    @property
    def speedup(self) -> float | None:
        """What the schedule ``compile`` applies gains over the default: verified (1.0 when the
        default is kept), else the records' own ratio."""
        if self.kept is not None:
            return self.candidate_speedup if self.kept else 1.0
        if self.default_ms is None or self.best_ms is None:
            return None
        return self.default_ms / self.best_ms

    @staticmethod
    def of_layer(layer: LayerResult) -> TaskResult:
        """A dense layer's row: kind ``"dense"``, trials = candidate kernels measured; verified as a
        task's (``_verify_layers``)."""
        search = layer.default_ms / layer.best_ms if layer.default_ms is not None and layer.best_ms else None
        verdict = layer.verdict
        if verdict is None:
            return TaskResult(layer.name, "dense", 1, layer.measured, layer.default_ms, layer.best_ms, layer.failed,
                              layer.error, search_speedup=search)
        default_ms = statistics.median(verdict.default_ms)
        best_ms = statistics.median(verdict.candidate_ms) if verdict.kept else default_ms
        return TaskResult(layer.name, "dense", 1, layer.measured, default_ms, best_ms, layer.failed, layer.error,
                          verdict.kept, verdict.speedup, search)


@dataclass
class TuneResults:
    """``tune``'s result: one :class:`TaskResult` per dense layer and kernel in ``tasks`` (the
    results iterate and index as that list), ``stopped``, why the tune ended before its budget was
    spent (None when it was not), and ``devices``, over RPC what each device measured, search
    trials and verification runs apart, and its failures, tries lost with it included
    (``{"host:port": DeviceStats}``), and ``target``, the target tuned for (a CPU target's
    ``num-cores`` is the thread count measured with)."""

    tasks: list[TaskResult] = field(default_factory=list)
    stopped: str | None = None
    devices: dict[str, DeviceStats] = field(default_factory=dict)
    target: tvm.target.Target | None = None

    @property
    def failed(self) -> int:
        """Failed trials of this tune, over all tasks."""
        return sum(r.failed for r in self.tasks)

    def __iter__(self) -> Iterator[TaskResult]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> TaskResult:
        return self.tasks[index]


@dataclass(eq=False)
class TaskState:
    """One task through a tune (meta_schedule's TaskRecord for this loop): its times and search
    trials on record, its search context, and the trials of this tune that failed."""

    task: Task
    default_ms: float | None = None  # the best default-schedule record
    best_ms: float | None = None  # the best record; during the search, the best measurement
    searched: int = 0  # search records in the database
    failed: int = 0
    error: str | None = None  # the last failed trial's error, in one line
    context: ms.TuneContext | None = None  # while the search runs
    verdict: Verification | None = None  # the task's latest verification in the database

    def read(self, db: AppendOnlyDatabase) -> None:
        """Take the times, the search trials and the verdict from the task's records in ``db``."""
        records = _records_of(db, self.task)
        timed = [(m, _is_seed(r)) for r in records if (m := mean_ms(r.run_secs)) is not None]
        self.default_ms = min((m for m, seed in timed if seed), default=None)
        self.best_ms = min((m for m, _seed in timed), default=None)
        self.searched = sum(not _is_seed(r) for r in records)
        self.verdict = db.verification(self.task.mod)

    def fail(self, result: ms.runner.RunnerResult) -> None:
        self.failed += 1
        self.error = short_error(result.error_msg)

    def count(self, results: list[ms.runner.RunnerResult]) -> int:
        """Count a measured batch (a faster time is the new best); how many of its trials failed."""
        failed = 0
        for result in results:
            measured = mean_ms(result.run_secs) if result.error_msg is None else None
            if measured is None:
                failed += 1
                self.fail(result)
            elif self.best_ms is None or measured < self.best_ms:
                self.best_ms = measured
        return failed

    def result(self) -> TaskResult:
        search = self.default_ms / self.best_ms if self.default_ms is not None and self.best_ms is not None else None
        verdict = self.verdict
        if verdict is None:
            return TaskResult(self.task.name, self.task.kind, self.task.weight, self.searched, self.default_ms,
                              self.best_ms, self.failed, self.error, search_speedup=search)
        default_ms = statistics.median(verdict.default_ms)
        best_ms = statistics.median(verdict.candidate_ms) if verdict.kept else default_ms
        return TaskResult(self.task.name, self.task.kind, self.task.weight, self.searched, default_ms, best_ms,
                          self.failed, self.error, verdict.kept, verdict.speedup, search)


def _failed(result: ms.runner.RunnerResult) -> bool:
    return result.error_msg is not None or mean_ms(result.run_secs) is None


def _device_unavailable(results: list[ms.runner.RunnerResult]) -> str | None:
    for result in results:
        if result.error_msg is not None and DEVICE_UNAVAILABLE in result.error_msg:
            return short_error(result.error_msg)
    return None


def _say(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        print(text, file=progress, flush=True)


def _intrinsics_module(target: tvm.target.Target) -> str:
    """The one submodule of ``tvm.s_tir.tensor_intrin`` whose intrinsics meta_schedule's default
    rules for ``target`` look up by name when they are made: on x86 the int8 dot products
    (``dot_16x4_vnni`` on AVX-512 VNNI / AMX / Zen 4 CPUs, ``dot_16x4_avx512`` on AVX-512BW), on
    ARM the NEON/SDOT/UDOT ones (``+dotprod`` or not)."""
    cpu = target if target.kind.name == "llvm" else target.host
    triple = str((cpu.attrs.get("mtriple") if cpu is not None else "") or tvm.target.codegen.llvm_get_system_triple())
    return "arm_cpu" if triple.startswith(("aarch64", "arm")) else "x86"


@derived_object
class _InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates in this process, one after the other.

    LocalBuilder starts a fresh worker pool for every batch, and each worker spends ~5-10 s
    importing TVM on this 2-core box: more than building a whole batch of these small kernels.
    A build that crashes LLVM takes the tune down, but every record measured so far is on disk.
    """

    def __init__(self, export: LibraryExport):
        super().__init__()
        self.export = export

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        results = []
        for item in build_inputs:
            try:
                results.append(ms.builder.BuilderResult(self.export(build_kernel(item.mod, item.target)), None))
            except Exception as err:  # a candidate TVM cannot lower is a failed trial, not a failed tune
                if termination.status() is not None:  # a SIGTERM, handed back by TVM's FFI: not the candidate's
                    raise
                results.append(ms.builder.BuilderResult(None, f"{type(err).__name__}: {str(err).strip()[-2000:]}"))
        return results


def _default_schedule(task: Task, target: tvm.target.Target) -> s_tir.Schedule | None:
    """The untuned compiler's schedule of a task as a replayable trace, or None if it has none."""
    func = task.mod["main"]
    if task.kind == "pattern":
        sch = s_tir.Schedule(task.mod)
        apply_default_schedule(sch, target)
        return sch
    for rule in default_schedule_rules(target):
        result = rule.apply(func, target, False)
        if isinstance(result, list):
            result = result[0] if result else None
        if result is not None:
            return result if result.trace is not None and len(result.trace.insts) else None
    return None


def _records_of(database: ms.database.Database, task: Task) -> list[ms.database.TuningRecord]:
    if not database.has_workload(task.mod):
        return []
    workload = database.commit_workload(task.mod)
    return [r for r in database.get_all_tuning_records() if r.workload.same_as(workload)]


def _is_seed(record: ms.database.TuningRecord) -> bool:
    """Default-schedule records are the ones whose traces sample nothing."""
    return len(record.trace.decisions) == 0


class _Progress:
    """One line per measured batch: trials so far, the task, its best time against its default
    (the search's own, unverified)."""

    def __init__(self, done: int, total: int, stream: TextIO | None, runner: ms.runner.Runner | DeviceFarm):
        self.done, self.total, self.stream = done, total, stream
        self.farm = runner if isinstance(runner, DeviceFarm) else None
        self.start = time.monotonic()

    def report(self, state: TaskState, measured: int, failed: int) -> None:
        self.done += measured
        if self.stream is None:
            return
        best, default = state.best_ms, state.default_ms
        text = f"search best {best:.4g} ms" if best is not None else "no valid candidate yet"
        if best is not None and default is not None:
            text += f" (default {default:.4g} ms, {default / best:.2f}x)"
        if failed:
            text += f", {failed} failed ({state.error})"
        if self.farm is not None:
            text += f"  [{self.farm.devices} device{'s' if self.farm.devices != 1 else ''}]"
        print(f"[{self.done:>5}/{self.total}] {time.monotonic() - self.start:6.0f}s  {state.task.name:<36} {text}",
              file=self.stream, flush=True)


def tune(
    model: str | os.PathLike | onnx.ModelProto | tvm.IRModule,
    target: str | dict | tvm.target.Target = "x86",
    *,
    trials: int = 64,
    database: str | os.PathLike = "tuning_db",
    rpc: str | None = None,
    params: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    entries: int = 4,
    max_patterns: int = 12,
    trials_per_iter: int = 16,
    timeout: float = 60.0,
    devices: int | None = None,
    seed: int = 0,
    progress: TextIO | None = sys.stderr,
    dense_kernels: bool = True,
    threads: int | None = None,
) -> TuneResults:
    """Tune a model's kernels for ``target`` and append the records to ``database`` (a directory).

    ``trials`` is the search budget over all tasks, counting search records already in the
    database (so an interrupted tune, re-run, finishes its budget); each task's default schedule
    is measured once on top. ``rpc`` = ``"tracker_host:port:device_key"`` measures on the devices
    registered under that key, up to ``devices`` at once (default: all the tracker lists, re-read
    before every batch, so phones that join later get work; see ``tuning.farm``).
    ``timeout``: seconds a local measurement may take; over RPC, the limit of every step (the
    tracker's answer, the device becoming free, its handshake, one measurement): a device that
    does not become free or answer in time ends the tune (it is gone or busy).
    Apply the result with ``compile(model, target, tuning_db=database, threads=...)``.

    ``threads``: every measurement runs with that many TVM runtime threads (on this machine, in the
    runner's worker process; over RPC, each session's runtime is set to it, which fails when the
    device's runtime started with fewer: restart its server with ``TVM_NUM_THREADS``), the design
    space is generated for it, and every record's target says it as ``num-cores``. None: what TVM's
    runtime runs on the measuring device (here ``TVM_NUM_THREADS``, else TVM's default: half the
    logical CPUs on x86; over RPC the device runtime's own count). A CPU target's own ``num-cores``
    is replaced by it. GPU (OpenCL) kernels have no thread count.

    Before the search, every candidate kernel of each dense conv layer (GEMM, direct and Winograd
    kernels and their register tiles, the rules' choice among them) is measured once and recorded
    (``kernel_records``; ``dense_kernels=False`` skips it): these kernels are not in
    meta_schedule's space. The fastest few are then verified against the rules' choice as a
    task's records are (``_verify_layers``), and ``compile`` runs each layer on its verdict's
    choice. Their rows in the results have kind ``"dense"``, trials = candidates measured.

    After the search, each task's fastest search records are verified against its default
    (``_verify_task``: back to back, ``VERIFY_ROUNDS`` rounds, cache flushed) and kept only if one
    wins by ``KEEP_MARGIN``; ``compile`` applies the verdict, and a result's ``speedup`` is the
    verified one (1.0 when the default is kept; ``search_speedup`` is what the search alone
    measured). A task whose search found nothing faster than its default is not verified.

    Returns a :class:`TuneResults` (it iterates and indexes as a list of :class:`TaskResult`):
    failed trials per task with their last error, and ``stopped`` set when the tune ended early
    (device unreachable, or ``MAX_FAILED_BATCHES`` batches in a row failed every trial); the
    records measured until then are in the database and a re-run resumes.
    """
    resolved = resolve_target(target)
    patterns = PatternOptions(entries, max_patterns)
    _check_arguments(trials, trials_per_iter, timeout, devices, rpc, threads)
    rpc_config = parse_rpc(rpc, session_timeout=timeout) if rpc is not None else None
    if rpc_config is None and not is_host_runnable(resolved):
        raise PatDNNError(f"target {resolved} is for {target_arch(resolved)}, this machine is {host_arch()}: tune on "
                          "the device with rpc='TRACKER_HOST:PORT:DEVICE_KEY'")
    if rpc_config is not None:
        _check_device(rpc_config, timeout)
    threads, unavailable = _measuring_threads(resolved, threads, rpc_config, timeout)
    if threads is not None:
        resolved = for_threads(resolved, threads)
    tasks, dense_layers = _extract(model, params, input_shapes, resolved, patterns, dense_kernels)
    db = open_for_tuning(database, resolved)
    states = [TaskState(task) for task in tasks]
    with _bench(resolved, db, tasks, rpc_config, timeout, devices, progress, threads) as bench:
        dense, stopped = ([], unavailable) if unavailable else tune_dense_kernels(
            dense_layers, resolved, Path(database), bench.measure, progress, _device_unavailable)
        if stopped is None:
            stopped = _verify_layers(dense, bench, Path(database))
        if stopped is None:
            stopped = _measure_defaults(states, bench)
        if stopped is None:
            stopped = _search_remaining(states, bench, trials, trials_per_iter, seed, str(database))
        if stopped is None:
            stopped = _verify(states, bench)
        devices_used = bench.devices
    for state in states:
        state.read(db)
    results = TuneResults([TaskResult.of_layer(layer) for layer in dense] + [s.result() for s in states],
                          stopped, devices_used, resolved)
    _say_how_it_ended(results, database, progress)
    return results


def _check_arguments(trials: int, trials_per_iter: int, timeout: float, devices: int | None, rpc: str | None,
                     threads: int | None) -> None:
    check_threads(threads)
    if not isinstance(trials, int) or trials < 0:
        raise PatDNNError(f"trials must be a non-negative integer, got {trials!r}")
    if not isinstance(trials_per_iter, int) or trials_per_iter < 1:
        raise PatDNNError(f"trials_per_iter must be a positive integer, got {trials_per_iter!r}")
    if not timeout > 0:
        raise PatDNNError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if devices is not None and (rpc is None or isinstance(devices, bool) or not isinstance(devices, int)
                                or devices < 1):
        raise PatDNNError(f"devices (how many devices measure at once) must be a positive integer and needs "
                          f"rpc=, got {devices!r}")


def _check_device(rpc: ms.runner.RPCConfig, timeout: float) -> None:
    """Fail now, in plain words, when the tracker is unreachable or has no such device."""
    try:
        check_tracker(rpc.tracker_host, rpc.tracker_port, rpc.tracker_key, timeout)
    except RuntimeError as err:
        raise PatDNNError(f"cannot tune over RPC: {err}") from None


def _measuring_threads(target: tvm.target.Target, threads: int | None, rpc: ms.runner.RPCConfig | None,
                       timeout: float) -> tuple[int | None, str | None]:
    """The threads the tune measures with (see ``tune``; None for GPU targets), and why the tune
    stops before measuring, if it does. Over RPC one session of the key's device is asked (and set
    to ``threads``, which fails if it cannot run them); a device that does not answer stops the tune."""
    if target.kind.name != "llvm":
        if threads is not None:
            for_threads(target, threads)  # the error: threads of a GPU target
        return None, None
    if rpc is None:
        if threads is not None and threads > (os.cpu_count() or 1):
            raise PatDNNError(f"threads={threads}, but this machine has {os.cpu_count()} CPUs: the measurements would "
                              "time threads sharing cores; tune on the device with rpc=")
        return (threads if threads is not None else runtime_threads()), None
    try:
        session = request_session(rpc.tracker_host, rpc.tracker_port, rpc.tracker_key, wait=timeout,
                                  session_timeout=timeout)
    except RuntimeError as err:
        # The device does not answer now: the tune stops early, as when a device goes away
        # mid-tune (a re-run resumes); the probe's session may still hold it at the tracker.
        return threads, str(err)
    try:
        return set_remote_threads(session, threads), None
    except RuntimeError as err:
        raise PatDNNError(f"cannot tune over RPC: {err}") from None
    finally:
        del session  # the device serves one session at a time


def _extract(model, params, input_shapes, target: tvm.target.Target, patterns: PatternOptions,
             dense_kernels: bool) -> tuple[list[Task], list[DenseConvSpec]]:
    """The model's meta_schedule tasks, and its dense conv layers whose kernels are measured
    (none when ``dense_kernels`` is False)."""
    imported = load_model(model, params=params, input_shapes=input_shapes)
    layers = KernelChoices()
    tasks = extract_tasks(imported.mod, target, patterns, kernel_choices=layers)
    dense_layers = list(layers.seen.values()) if dense_kernels else []
    if not tasks and not dense_layers:
        raise PatDNNError("the model has no kernels to tune")
    return tasks, dense_layers


@dataclass
class _Bench:
    """Where a tune measures and what it records into: the target, the database, the in-process
    builder, the local runner or device farm, the progress stream, and the verification's runner
    (same kind, more repeats; its runs are not trials). Each runner is started when first needed: a
    local one spends ~5-15 s starting its worker, which a tune with nothing left to measure or
    verify (a re-run) does not need."""

    target: tvm.target.Target
    db: AppendOnlyDatabase
    builder: _InProcessBuilder
    progress: TextIO | None
    start_runner: Callable[[], ms.runner.Runner | DeviceFarm]
    start_verifier: Callable[[], ms.runner.Runner | DeviceFarm]
    devices: dict[str, DeviceStats]  # over RPC, what each device measured (both farms count into it)
    searcher: ms.runner.Runner | DeviceFarm | None = None
    verifier: ms.runner.Runner | DeviceFarm | None = None

    @property
    def runner(self) -> ms.runner.Runner | DeviceFarm:
        """The search's runner (trials)."""
        if self.searcher is None:
            self.searcher = self.start_runner()
        return self.searcher

    def measure(self, candidates: list[ms.search_strategy.MeasureCandidate]) -> list[ms.runner.RunnerResult]:
        """Build and run a batch to completion (a failed build is a failed run)."""
        built = self.build(candidates)
        try:
            return self.run(self.runner, candidates, built)
        finally:
            _remove(built)

    def build(self, candidates: list[ms.search_strategy.MeasureCandidate]) -> list[ms.builder.BuilderResult]:
        """Libraries of the candidates (remove them with ``_remove``)."""
        return self.builder.build([ms.builder.BuilderInput(c.sch.mod, self.target) for c in candidates])

    def run(self, runner: ms.runner.Runner | DeviceFarm, candidates: list[ms.search_strategy.MeasureCandidate],
            built: list[ms.builder.BuilderResult]) -> list[ms.runner.RunnerResult]:
        """Run built candidates (a failed build is a failed run); a result's time is the median of
        its runs (``_evaluator``).

        On a device farm the batch runs on all its devices at once. Otherwise candidates run one
        after the other (the runners have one worker anyway); once one finds the device unavailable
        the rest are not sent, each would wait for it again.
        """
        if isinstance(runner, DeviceFarm):
            runnable = [ms.runner.RunnerInput(b.artifact_path, "cpu", c.args_info)
                        for c, b in zip(candidates, built) if b.error_msg is None]
            measured = iter(runner.measure(runnable))
            return [_median(next(measured)) if b.error_msg is None else ms.runner.RunnerResult(None, b.error_msg)
                    for b in built]
        results: list[ms.runner.RunnerResult] = []
        unavailable = None
        for candidate, b in zip(candidates, built):
            if b.error_msg is not None:
                results.append(ms.runner.RunnerResult(None, b.error_msg))
            elif unavailable is not None:
                results.append(ms.runner.RunnerResult(None, f"not measured: {unavailable}"))
            else:
                (future,) = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", candidate.args_info)])
                results.append(_median(future.result()))
                unavailable = _device_unavailable(results[-1:])
        return results

    def verification_runner(self) -> ms.runner.Runner | DeviceFarm:
        if self.verifier is None:
            self.verifier = self.start_verifier()
        return self.verifier

    def commit(self, workload: ms.database.Workload, trace: s_tir.Trace, result: ms.runner.RunnerResult,
               args_info: list) -> None:
        self.db.commit_tuning_record(ms.database.TuningRecord(trace, workload, result.run_secs, self.target, args_info))


def _median(result: ms.runner.RunnerResult) -> ms.runner.RunnerResult:
    """The result with its runs' median as its one time: a run that another process preempted
    is an outlier, not the kernel's time."""
    if result.error_msg is not None or not result.run_secs:
        return result
    return ms.runner.RunnerResult([statistics.median(float(s) for s in result.run_secs)], None)


def _remove(built: list[ms.builder.BuilderResult]) -> None:
    for b in built:
        if b.artifact_path is not None:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)


def _evaluator(repeat: int, flush: bool) -> ms.runner.EvaluatorConfig:
    """Every measurement: ``repeat`` single runs, each after the arguments but the first (the
    input, which the previous layer leaves in cache) are flushed from the CPU caches, as a kernel
    finds its weights in a model; its time is their median (``_Bench.run``). meta_schedule's usual
    mean over 40 ms windows counts whatever else runs on the core: on a shared core it read 2-12x
    the kernel's time (session 12, VGG-16 CIFAR conv1's default on a busy core: 2.95 ms in a
    search; in one process, alternating, 0.48-1.49 ms that way and 0.20-0.27 ms as the median of
    single runs). Cache flushing is a CPU instruction on host memory: ``flush``
    is False for GPU arguments."""
    return ms.runner.EvaluatorConfig(number=1, repeat=repeat, min_repeat_ms=0, enable_cpu_cache_flush=flush)


@contextlib.contextmanager
def _bench(target: tvm.target.Target, db: AppendOnlyDatabase, tasks: list[Task], rpc: ms.runner.RPCConfig | None,
           timeout: float, devices: int | None, progress: TextIO | None, threads: int | None) -> Iterator[_Bench]:
    """A bench whose libraries and argument file live in a scratch folder for the tune's length,
    measuring with ``threads`` threads; its runners are closed at its end."""
    with tempfile.TemporaryDirectory(prefix="patdnn-tune-") as scratch:
        arguments = PackedArguments.write(
            os.path.join(scratch, "arguments.npz"), {signature(t.args_info): t.int_args for t in tasks}
        )
        builder = _InProcessBuilder(LibraryExport(linker_for(target), scratch))
        flush = target.kind.name == "llvm"
        stats: dict[str, DeviceStats] = {}
        bench = _Bench(target, db, builder, progress,
                       lambda: _runner(rpc, arguments, timeout, devices, threads, SEARCH_REPEATS, flush, stats),
                       lambda: _runner(rpc, arguments, timeout, devices, threads, VERIFY_REPEATS, flush, stats,
                                       verification=True),
                       stats)
        try:
            yield bench
        finally:
            for used in (bench.searcher, bench.verifier):
                if isinstance(used, DeviceFarm):
                    used.close()
                elif used is not None:  # its worker process, now rather than whenever it is collected
                    used.pool.shutdown(wait=False)


def _runner(rpc: ms.runner.RPCConfig | None, arguments: PackedArguments, timeout: float,
            devices: int | None, threads: int | None, repeat: int, flush: bool, stats: dict[str, DeviceStats],
            verification: bool = False) -> ms.runner.Runner | DeviceFarm:
    """This machine's runner, or over RPC a farm of the tracker's devices of the key, measuring
    with ``threads`` TVM threads (``_evaluator(repeat, flush)``), counting each device's tries into
    ``stats`` (as verification runs with ``verification``)."""
    evaluator = _evaluator(repeat, flush)
    if rpc is None:
        try:  # the runner starts its worker (and so its thread pool) here
            return ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator,
                                         f_alloc_argument=arguments.local,
                                         initializer=LocalThreads(threads) if threads is not None else None)
        except Exception as err:  # noqa: BLE001 - the worker's error, from another process
            raise PatDNNError(f"cannot start the measuring process with {describe(threads)}: "
                              f"{short_error(str(err))}") from None
    return DeviceFarm(rpc, evaluator, arguments, wait=timeout, max_devices=devices, threads=threads,
                      stats=stats, verification=verification)


def _measure_defaults(states: list[TaskState], bench: _Bench) -> str | None:
    """Measure and commit the default schedule of every task that has no record yet; why the
    tune must stop (the device is gone), or None."""
    todo = [(state, sch) for state in states if not _records_of(bench.db, state.task)
            and (sch := _default_schedule(state.task, bench.target)) is not None]
    if not todo:
        return None
    _say(bench.progress, f"measuring the default schedule of {len(todo)} kernel(s)")
    candidates = [ms.search_strategy.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_prim_func(state.task.mod["main"]))
                  for state, sch in todo]
    results = bench.measure(candidates)
    for (state, sch), candidate, result in zip(todo, candidates, results):
        if _failed(result):  # a failed default is retried by the next tune
            state.fail(result)
            _say(bench.progress, f"default schedule of {state.task.name} failed: {state.error}")
            continue
        bench.commit(bench.db.commit_workload(state.task.mod), sch.trace, result, candidate.args_info)
    return _device_unavailable(results)


def _search_remaining(states: list[TaskState], bench: _Bench, trials: int, trials_per_iter: int, seed: int,
                      work_dir: str) -> str | None:
    """Search for what the budget ``trials`` leaves after the search records already in the
    database; why the search stopped early, or None."""
    for state in states:
        state.read(bench.db)
    searched = sum(state.searched for state in states)
    remaining = max(0, trials - searched)
    threads = thread_count(bench.target)
    at = f" at {describe(threads)}" if threads is not None else ""
    _say(bench.progress, f"tuning {len(states)} kernel(s) ({sum(s.task.kind == 'pattern' for s in states)} pattern "
                         f"conv) for {target_key(bench.target)}{at}: {searched} trials in {work_dir} already, "
                         f"{remaining} to go")
    if not remaining or not states:
        return None
    with filter_tvm_noise():  # 'Unknown schedule rule "meta_schedule.pool_max"': see tvm_noise
        return _search(states, bench, remaining, trials_per_iter, seed,
                       _Progress(searched, trials, bench.progress, bench.runner), work_dir)


def _verify(states: list[TaskState], bench: _Bench) -> str | None:
    """Verify every task whose search records are not yet (see ``_verify_task``); why the device
    became unavailable, or None."""
    for state in states:
        gone = _verify_task(state, bench)
        if gone is not None:
            return gone
    return None


def _verify_task(state: TaskState, bench: _Bench) -> str | None:
    """Re-measure the task's ``VERIFY_CANDIDATES`` fastest distinct search records against its
    default schedule (``_compare``) and append the verdict (``database.Verification``): the
    candidate with the best ``_verified_speedup`` if that reaches ``KEEP_MARGIN``, else the default.

    Skipped when the task has no default record or no timed search record, when the default is
    its fastest record (it applies anyway), or when its latest verdict covers every search
    record. Returns why the device became unavailable, or None.
    """
    records = _records_of(bench.db, state.task)
    searched = sum(not _is_seed(r) for r in records)
    previous = bench.db.verification(state.task.mod)
    if previous is not None and previous.trials == searched:
        return None
    timed = sorted(((m, r) for r in records if (m := mean_ms(r.run_secs)) is not None), key=lambda t: t[0])
    default = next((r for _m, r in timed if _is_seed(r)), None)
    candidates: dict[str, ms.database.TuningRecord] = {}
    for _m, record in timed:
        if not _is_seed(record) and len(candidates) < VERIFY_CANDIDATES:
            candidates.setdefault(str(record.trace.as_json()), record)
    if default is None or not candidates or _is_seed(timed[0][1]):
        return None  # nothing to verify, or the search found nothing faster: the default applies
    entries = [default, *candidates.values()]
    outcome, gone = _compare(bench, state.task.name,
                             [ms.search_strategy.MeasureCandidate(_replay(r), r.args_info) for r in entries])
    if outcome is None:
        return gone
    record = ms.database.TuningRecord(entries[outcome.winner].trace, default.workload,
                                      [t / 1e3 for t in outcome.winner_ms], bench.target, default.args_info)
    bench.db.commit_verification(Verification(record, state.task.name, outcome.kept, outcome.speedup,
                                              outcome.default_ms, outcome.candidate_ms, searched))
    _say(bench.progress, outcome.describe(state.task.name, _search_claim(timed)))
    return None


def _verify_layers(results: list[LayerResult], bench: _Bench, database: Path) -> str | None:
    """Verify every dense layer's kernel choice whose measurements are not yet: its
    ``VERIFY_CANDIDATES`` fastest non-default candidates against the rules' choice (``_compare``,
    as a task's records), the verdict appended to ``dense_kernels.json``
    (``kernel_records.DenseVerdict``) and set on the layer's result. Skipped as ``_verify_task``
    skips a task (``kernel_records.to_verify``). Returns why the device became unavailable, or None."""
    for result in results:
        todo = to_verify(result.layer, bench.target, database, VERIFY_CANDIDATES)
        if todo is None:
            continue
        outcome, gone = _compare(bench, result.name, [measure_candidate(spec) for spec in todo.specs])
        if outcome is None:
            if gone is not None:
                return gone
            continue
        result.verdict = todo.verdict(outcome.best, outcome.kept, outcome.speedup, outcome.default_ms,
                                      outcome.candidate_ms)
        commit_verdict(database, bench.target, result.layer, result.verdict)
        _say(bench.progress, outcome.describe(result.name, todo.search_claim)
             + (f": {result.verdict.choice}" if outcome.kept else ""))
    return None


@dataclass(frozen=True)
class _Comparison:
    """A verification's outcome: the default's and the best candidate's ms per round, the best
    candidate (its index in the entries compared, the default being 0), its verified speedup,
    and how many candidates were still timed at the end."""

    best: int
    speedup: float
    default_ms: tuple[float, ...]
    candidate_ms: tuple[float, ...]
    candidates: int

    @property
    def kept(self) -> bool:
        return self.speedup >= KEEP_MARGIN

    @property
    def winner(self) -> int:
        """The entry that applies: the best candidate when kept, else the default (0)."""
        return self.best if self.kept else 0

    @property
    def winner_ms(self) -> tuple[float, ...]:
        return self.candidate_ms if self.kept else self.default_ms

    def describe(self, name: str, search_claim: float) -> str:
        verdict = "candidate kept" if self.kept else f"default kept (a candidate must win by {KEEP_MARGIN:.2f}x)"
        return (f"verified {name}: default {statistics.median(self.default_ms):.4g} ms, best of {self.candidates} "
                f"candidate(s) {statistics.median(self.candidate_ms):.4g} ms, {self.speedup:.2f}x (over "
                f"{VERIFY_ROUNDS} rounds; the search said {search_claim:.2f}x): {verdict}")


def _compare(bench: _Bench, name: str, entries: list[ms.search_strategy.MeasureCandidate]
             ) -> tuple[_Comparison | None, str | None]:
    """Measure the default (``entries[0]``) and its candidates back to back with the verification
    runner: ``VERIFY_ROUNDS`` rounds, each measuring all of them once in an order rotated by one
    per round; the best candidate by ``_verified_speedup``. A candidate that fails is dropped; if
    the default fails, or no candidate is left, there is no outcome (None). Returns (the outcome,
    why the device became unavailable or None)."""
    built = bench.build(entries)
    runner = bench.verification_runner()
    times: list[list[float] | None] = [[] for _ in entries]  # ms per round; None: dropped
    try:
        for round_ in range(VERIFY_ROUNDS):
            for i in (round_ + k for k in range(len(entries))):
                i %= len(entries)
                if times[i] is None:
                    continue
                (result,) = bench.run(runner, [entries[i]], [built[i]])
                gone = _device_unavailable([result])
                if gone is not None:
                    return None, gone
                if _failed(result):
                    times[i] = None
                    if i == 0:
                        _say(bench.progress, f"verifying {name}: the default failed "
                                             f"({short_error(result.error_msg)}); not verified")
                        return None, None
                    continue
                times[i].append(float(result.run_secs[0]) * 1e3)
    finally:
        _remove(built)
    ratios = {i: _verified_speedup(times[0], times[i]) for i in range(1, len(entries)) if times[i]}
    if not ratios:
        return None, None
    best = max(ratios, key=ratios.__getitem__)
    return _Comparison(best, ratios[best], tuple(times[0]), tuple(times[best]), len(ratios)), None


def _verified_speedup(default_ms: list[float], candidate_ms: list[float]) -> float:
    """default / candidate from the rounds: the smaller of the median of the per-round ratios and
    the ratio of each one's fastest round. Another job on the core or the shared cache only ever
    slows a run, and not both alike: in the VGG-16 CIFAR tune of session 12 conv4's default ran
    0.20-0.30 ms per round beside the candidate's steady 0.24, the median ratio said 1.08x and
    in-process A/B 0.76x (0.84x between the fastest rounds). A candidate must win both ways."""
    median = statistics.median(d / c for d, c in zip(default_ms, candidate_ms))
    return min(median, min(default_ms) / min(candidate_ms))


def _search_claim(timed: list[tuple[float, ms.database.TuningRecord]]) -> float:
    """The search's own speedup: the default record's time over the fastest record's."""
    return next(m for m, r in timed if _is_seed(r)) / timed[0][0]


def _replay(record: ms.database.TuningRecord) -> s_tir.Schedule:
    """The record's schedule, replayed as ``compile`` replays it."""
    sch = s_tir.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def _say_how_it_ended(results: TuneResults, database: str | os.PathLike, progress: TextIO | None) -> None:
    if results.stopped:
        _say(progress, f"tuning stopped early: {results.stopped}")
    if results.failed or results.stopped:
        _say(progress, f"{results.failed} trial(s) failed; the records measured are in {database}"
                       + (" (re-run the same command to resume)" if results.stopped else ""))


@contextlib.contextmanager
def _log_files(work_dir: str, tasks: list[Task]) -> Iterator[list[logging.Logger]]:
    """Per-task loggers (search strategy, design spaces) writing to ``work_dir/logs`` only.

    (meta_schedule's own logger set-up also prints every step to the console, and breaks when
    another handler without a name, such as pytest's, is installed.)
    """
    logs = Path(work_dir) / "logs"
    logs.mkdir(exist_ok=True)
    formatter = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s")
    attached: list[tuple[logging.Logger, logging.Handler, int, bool]] = []

    def to_file(logger: logging.Logger, filename: str) -> logging.Logger:
        handler = logging.FileHandler(logs / filename)
        handler.setFormatter(formatter)
        attached.append((logger, handler, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        return logger

    try:
        yield [to_file(logging.getLogger(f"tvm_patdnn.tuning.task{i}"), f"task_{i}_{task.name}.log")
               for i, task in enumerate(tasks)]
    finally:
        for logger, handler, level, propagate in attached:
            logger.removeHandler(handler)
            handler.close()
            logger.setLevel(level)
            logger.propagate = propagate


def tuning_contexts(
    tasks: list[Task],
    target: tvm.target.Target,
    cores: int,
    seed: int = 0,
    loggers: list[logging.Logger] | None = None,
) -> list[tuple[ms.TuneContext, list[s_tir.Schedule]]]:
    """One meta_schedule TuneContext per task with its design space (pattern convs: ours; the
    rest: meta_schedule's default space for the target's CPU), nothing measured.

    Any error of meta_schedule here is a PatDNNError naming the kernel and the target: the
    default rules differ per CPU family (VNNI, AVX-512, NEON dot product), so a failure is
    about this target, not about the model.
    """
    # meta_schedule's CPU parallel rules need the core count; phone presets leave it to the device.
    space_target = target
    if target.kind.name == "llvm" and not target.attrs.get("num-cores"):
        space_target = tvm.target.Target({**target.export(), "num-cores": cores})
    contexts = []
    with only_tensor_intrinsics(_intrinsics_module(target)):
        for index, task in enumerate(tasks):
            try:
                ctx = ms.TuneContext(
                    mod=task.mod,
                    target=space_target,
                    space_generator=pattern_conv_space_generator(space_target) if task.kind == "pattern" else "post-order-apply",
                    search_strategy=ms.search_strategy.EvolutionarySearch(
                        population_size=96, init_min_unmeasured=16, genetic_num_iters=3
                    ),
                    task_name=task.name,
                    logger=loggers[index] if loggers else None,
                    rand_state=seed + index,
                    num_threads=cores,
                ).clone()
                space = list(ctx.generate_design_space())
            except Exception as err:  # meta_schedule raises ValueError/TVMError from C++ for its rules
                message = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
                raise PatDNNError(f"meta_schedule cannot tune kernel {task.name} for target {target_key(target)}: "
                                  f"{message[-1].strip()}") from err
            if not space:
                raise PatDNNError(f"meta_schedule has no schedule for kernel {task.name} on target {target_key(target)}")
            contexts.append((ctx, space))
    return contexts


def _search(states: list[TaskState], bench: _Bench, trials: int, trials_per_iter: int, seed: int,
            progress: _Progress, work_dir: str) -> str | None:
    """Evolutionary search with the XGBoost cost model, round robin over the tasks.

    meta_schedule's task scheduler commits a batch only when it next joins that task (after a
    whole first round over all tasks), and builds one task while the previous one runs; this
    loop measures each batch alone (2 cores: a build would disturb the timing) and appends its
    records before the next batch starts, so a killed tune loses at most the batch in flight.
    """
    cores = os.cpu_count() or 1  # the search's own threads (cost model, candidates), not the measurements'
    per_iter = max(1, min(trials_per_iter, trials // len(states) or 1))
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=cores)
    tasks = [state.task for state in states]
    with _log_files(work_dir, tasks) as loggers:
        started = []
        for state, (ctx, space) in zip(states, tuning_contexts(tasks, bench.target, cores, seed, loggers)):
            ctx.pre_tuning(trials, per_iter, space, bench.db, cost_model)
            state.context = ctx
            started.append(state)
        try:
            return _round_robin(states, bench, cost_model, trials, progress)
        finally:
            for state in started:
                state.context.post_tuning()
                state.context = None


def _round_robin(states: list[TaskState], bench: _Bench, cost_model: ms.cost_model.CostModel, trials: int,
                 progress: _Progress) -> str | None:
    """Batches of each task in turn until ``trials`` are spent or no task has candidates left.

    Returns why it stopped early, or None: the device became unavailable (that batch's failed
    trials are then not recorded: they were never measured, a re-run measures them), or
    ``MAX_FAILED_BATCHES`` batches in a row failed every trial.
    """
    active = list(states)
    failed_batches = 0
    while trials > 0 and active:
        for state in list(active):
            candidates = state.context.generate_measure_candidates() if trials > 0 else None
            if not candidates:
                active.remove(state)  # budget spent, or the space has nothing new
                continue
            candidates = list(candidates)[:trials]
            results, gone = _search_batch(state, bench, cost_model, candidates)
            failed = state.count(results)
            progress.report(state, len(results), failed)
            trials -= len(candidates)
            failed_batches = failed_batches + 1 if failed == len(results) else 0
            if gone is not None:
                return gone
            if failed_batches >= MAX_FAILED_BATCHES:
                return f"{failed_batches} batches in a row failed every trial, last error: {state.error}"
    return None


def _search_batch(
    state: TaskState, bench: _Bench, cost_model: ms.cost_model.CostModel,
    candidates: list[ms.search_strategy.MeasureCandidate],
) -> tuple[list[ms.runner.RunnerResult], str | None]:
    """Measure one batch of a task, append its records, and feed the results to the search and
    the cost model; (the results, why the device is unavailable or None)."""
    results = bench.measure(candidates)
    gone = _device_unavailable(results)
    workload = bench.db.commit_workload(state.task.mod)
    for candidate, result in zip(candidates, results):
        if gone is None or not _failed(result):
            bench.commit(workload, candidate.sch.trace, result, candidate.args_info)
    state.context.notify_runner_results(candidates, results)
    cost_model.update(state.context, candidates, results)
    return results, gone
