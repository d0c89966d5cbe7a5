"""The thread count kernels are tuned and compiled for, and how a measurement runs with it.

TVM's convention: a CPU target's ``num-cores`` is the core count its schedules are made for
(meta_schedule's parallel rules, the pattern conv's filters interleaved over threads), while the
runtime runs as many threads as ``TVM_NUM_THREADS`` says (without it, TVM takes the logical CPUs,
halved on x86 for hyper-threading: 1 thread on a 2-core VM). A schedule measured fastest at one
thread count is not the fastest at another (the shipped Zen 3 records, tuned at 1 thread, ran
1.10-1.16x slower at 2 threads than the untuned default rules), so ``tune`` measures with a
stated count, writes it into every record's target as ``num-cores``, and ``compile`` applies the
records of the count it compiles for (:func:`preference`).

The runtime's count is fixed when its thread pool starts (``runtime.config_threadpool`` can only
lower it), so a local measurement sets ``TVM_NUM_THREADS`` in the runner's fresh worker process
before anything runs there, and a device's RPC session is lowered to the count and checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import tvm
from tvm.target import Target

from ..errors import PatDNNError
from ..targets import keep_cpu_pinning

__all__ = ["LocalThreads", "RemoteThreads", "check_threads", "describe", "for_threads", "not_applied", "preference",
           "runtime_mismatch", "set_remote_threads", "thread_count"]

_BIG_CORES = 1  # runtime.config_threadpool's affinity mode kBig: TVM's default placement


def check_threads(threads: object) -> int | None:
    """``threads`` as given (None: unstated), or PatDNNError unless it is a positive integer."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise PatDNNError(f"threads must be a positive integer (the TVM runtime threads the model runs with), "
                          f"got {threads!r}")
    return threads


def thread_count(target: Target) -> int | None:
    """The threads a CPU target's code is made for (its ``num-cores``); None when it does not
    say, and for GPU targets (their kernels do not run on the CPU's thread pool)."""
    if target.kind.name != "llvm":
        return None
    cores = target.attrs.get("num-cores")
    return int(cores) if cores else None


def runtime_mismatch(target: Target) -> str | None:
    """A note when this process's TVM runtime runs another thread count than ``target``'s code is
    made for: the library then runs, but its work split (and its tuned schedules) fit another count."""
    made_for = thread_count(target)
    running = int(tvm.runtime.num_threads())
    if made_for is None or made_for == running:
        return None
    return (f"note: the model is compiled for {describe(made_for)}, TVM's runtime here runs {describe(running)}: "
            f"set TVM_NUM_THREADS={made_for} before starting, or compile with --threads {running}")


def for_threads(target: Target, threads: int) -> Target:
    """The CPU target with ``num-cores`` = ``threads``."""
    if target.kind.name != "llvm":
        raise PatDNNError(f"threads applies to CPU (llvm) targets; {target.kind.name} target {target} runs its "
                          "kernels on the device's GPU")
    return Target({**target.export(), "num-cores": threads})


def preference(counts: Iterable[int | None], threads: int | None) -> list[int | None]:
    """The measurements, by thread count, that serve a compile for ``threads``, best first: its own
    count, then measurements that do not say theirs (None). Another count's are not used: the
    1-thread Zen 3 records ran 1.10-1.16x *slower than the default rules* at 2 threads (VGG-16
    CIFAR, interleaved A/B runs). A target that does not say its count (``threads`` None) takes
    any: unrecorded first, then the fewest threads."""
    counts = set(counts)
    if threads is None:
        return sorted(counts, key=lambda count: (count is not None, count or 0))
    return [count for count in (threads, None) if count in counts]


def not_applied(counts: Iterable[int | None], threads: int | None) -> list[int]:
    """The counts among ``counts`` whose measurements a compile for ``threads`` does not use, nearest first."""
    used = preference(counts, threads)
    others = {count for count in counts if count not in used}
    return sorted(others, key=lambda count: (abs(count - threads), count))


def describe(threads: int | None) -> str:
    """``1 thread``, ``4 threads``; None: records that do not say."""
    if threads is None:
        return "an unrecorded thread count"
    return f"{threads} thread{'s' if threads != 1 else ''}"


@dataclass(frozen=True)
class LocalThreads:
    """LocalRunner ``initializer``: the worker process measures with ``threads`` threads. It runs
    in the fresh worker before any kernel, so the thread pool starts with that count."""

    threads: int

    def __call__(self) -> None:
        os.environ["TVM_NUM_THREADS"] = str(self.threads)
        keep_cpu_pinning()  # a tune started under taskset measures on those CPUs
        running = int(tvm.runtime.num_threads())
        if running != self.threads:
            raise RuntimeError(f"the measuring process runs {running} TVM threads, not {self.threads}")


@dataclass(frozen=True)
class RemoteThreads:
    """RPCRunner ``f_create_session``: ``create``'s session, its TVM runtime lowered to ``threads``
    threads (every session is a fresh runtime on the device). A device whose runtime runs fewer
    threads cannot be raised from here: that is an error naming the fix."""

    create: Callable
    threads: int

    def __call__(self, config):
        session = self.create(config)
        set_remote_threads(session, self.threads)
        return session


def set_remote_threads(session, threads: int | None) -> int:
    """Set the session's TVM runtime to ``threads`` threads (None: leave its default); the count
    it runs. RuntimeError when the device cannot run that many (``config_threadpool`` only lowers
    the count its runtime started with)."""
    if threads is not None:
        session.get_function("runtime.config_threadpool")(_BIG_CORES, threads)
    running = int(session.get_function("runtime.NumThreads")())
    if threads is not None and running != threads:
        raise RuntimeError(f"the device's TVM runtime runs at most {running} thread(s), not {threads}: start its "
                           f"RPC server with TVM_NUM_THREADS={threads}, or tune with threads={running}")
    return running
