"""Tuning records on disk: meta_schedule's JSONDatabase format, one directory per device.

A database directory holds ``database_workload.json`` and ``database_tuning_record.json``, one
JSON document per line (meta_schedule's JSONDatabase format), only ever appended to, so a killed
tune loses at most the line being written. That torn last line is the one thing dropped when a
tune reopens the database; readers (``compile``) skip it. Tunes write through
:class:`AppendOnlyDatabase`, which appends each line in one write under the directory's lock, so several
processes can tune into one directory at once (meta_schedule's own writer appends a record and
its newline in two writes, unlocked, and numbers workloads by what it alone has seen).

Records carry their target. ``compile`` applies only records whose target key (kind, triple,
CPU, features; not the core count) matches its own: a record tuned for one CPU says nothing
about another. The target's ``num-cores`` is the thread count the record was measured at
(``tuning.threads``); one directory holds a device's records for any number of thread counts.
``compile`` applies, kernel by kernel, a record of the thread count it compiles for, else one that
does not say its count (tuned for a target without ``num-cores``); records of another count are
not applied (they lost to the default rules: ``threads.preference``), and :class:`ScheduleSource`
says how many kernels had only those, so a tune at the wrong count is not silently ignored.
Shipped databases are package data, ``tvm_patdnn/schedules/<target key>/``, so a wheel install
has them too.

``verified.json`` holds the tuner's verdicts (:class:`Verification`, one JSON line each, appended
under the lock): the best searched candidates re-measured against the default, back to back. The
search keeps the fastest of many noisy, warm, one-off measurements, which overstates it (session
11: 1.15-1.56x printed, 0.83-1.13x in process), so for a workload with a verdict at a thread
count ``compile`` applies the verdict's record (the latest), not the fastest search record: the
candidate when it won by the margin, else the default's seed. Workloads without one (shipped
records, tunes stopped before the verification) keep the fastest record.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.resources
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import PatDNNError
from ..transform.kernel_choice import KernelChoices
from .measure import finish_schedule
from .tasks import normalize
from .threads import describe, not_applied, preference, thread_count

__all__ = [
    "AppendOnlyDatabase",
    "DeviceRecords",
    "KERNEL_CHOICES",
    "RECORDS",
    "SCHEDULES_DIR",
    "ScheduleSource",
    "VERIFIED",
    "Verification",
    "WORKLOADS",
    "apply_tuning_records",
    "directory_lock",
    "read_json_lines",
    "load_device_records",
    "load_records",
    "open_for_tuning",
    "record_targets",
    "shipped_database",
    "target_key",
    "tuning_records_pass",
]

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
KERNEL_CHOICES = "dense_kernels.json"  # the dense kernels measured per layer (tuning.kernel_records)
VERIFIED = "verified.json"  # the tuner's verdicts: which record each workload runs (Verification)
SCHEDULES_DIR = Path(str(importlib.resources.files("tvm_patdnn") / "schedules"))


@contextmanager
def directory_lock(path: Path) -> Iterator[None]:
    """Hold the database directory's lock: every writer appends under it. The lock is a ``flock``
    of the directory itself, so no lock file is left behind: :class:`AppendOnlyDatabase` takes
    the lock to read too, and a ``.lock`` file it left in a shipped ``schedules/`` directory
    (``benchmarks.tuning --shipped`` reads the tuner's claims that way) dirtied the checkout."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def target_key(target: Target) -> str:
    """What identifies a device's records: kind, triple, CPU and features (e.g. ``llvm-znver3``)."""
    parts = [target.kind.name]
    for attr in ("mtriple", "mcpu"):
        value = target.attrs.get(attr)
        if value:
            parts.append(str(value))
    features = sorted(str(f).lstrip("+") for f in (target.attrs.get("mattr") or []))
    parts.extend(features)
    return "-".join(parts).replace("/", "_")


def open_for_tuning(path: str | os.PathLike, target: Target) -> AppendOnlyDatabase:
    """Open (creating it) a database directory to append records for ``target``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PatDNNError(f"cannot use tuning database {path}: {err}") from err
    database = AppendOnlyDatabase(path, target)
    foreign = database.keys - {target_key(target)}
    if foreign:
        raise PatDNNError(
            f"tuning database {path} holds records for {', '.join(sorted(foreign))}, not {target_key(target)}: "
            "use one database directory per device"
        )
    return database


@dataclass(frozen=True)
class Verification:
    """The tuner's verdict on a workload: its best searched candidate re-measured against its
    default, alternately, in rounds (times in ms per round). ``record`` is what ``compile``
    applies: the candidate's trace when ``kept``, else the default's seed trace, with the winner's
    per-round times as its run time. ``trials``: the workload's search records when verified (a
    tune that adds trials verifies again)."""

    record: ms.database.TuningRecord
    kernel: str
    kept: bool
    speedup: float  # default / candidate over the rounds (the tuner's ``_verified_speedup``)
    default_ms: tuple[float, ...]
    candidate_ms: tuple[float, ...]
    trials: int

    def as_json(self, workload_index: int) -> dict:
        return {"workload": workload_index, "kernel": self.kernel, "kept": self.kept, "speedup": self.speedup,
                "default_ms": list(self.default_ms), "candidate_ms": list(self.candidate_ms),
                "trials": self.trials, "record": self.record.as_json()}

    @staticmethod
    def from_json(entry: dict, workload: ms.database.Workload) -> Verification:
        return Verification(ms.database.TuningRecord.from_json(entry["record"], workload), str(entry["kernel"]),
                            bool(entry["kept"]), float(entry["speedup"]), tuple(map(float, entry["default_ms"])),
                            tuple(map(float, entry["candidate_ms"])), int(entry["trials"]))


def _verdict(entry: object, workloads: list[ms.database.Workload], where: str) -> tuple[int, Verification]:
    """(workload index, Verification) of a ``verified.json`` line; PatDNNError if it is not one."""
    try:
        index = entry["workload"]
        if not isinstance(index, int) or not 0 <= index < len(workloads):
            raise PatDNNError(f"{where} names workload {index}, which does not exist")
        return index, Verification.from_json(entry, workloads[index])
    except PatDNNError:
        raise
    except Exception as err:  # a missing key, TVM's errors on a malformed record
        raise PatDNNError(f"{where} is not a verified record: {str(err).strip().splitlines()[-1]}") from None


@derived_object
class AppendOnlyDatabase(ms.database.PyDatabase):
    """meta_schedule's JSON database, safe for several writers (processes) at once.

    Queries go to an in-memory copy. Every append takes an exclusive ``flock`` on the
    directory's lock, first reads the lines other writers appended since (so a record's
    workload index is its line in the file *now*, not in this process's view of it), then
    writes the whole line, newline included, in one ``write``. A last line without its newline
    found under the lock was left by a killed writer and is cut.

    With ``target``, queries see only the records of its thread count: a tune at one count must
    neither count another's trials as its own nor breed its search from their times. ``keys``
    holds the target keys of every record in the files. Verdicts (:class:`Verification`) are
    kept apart from the records: the search breeds from its own measurements, and a verdict is
    not a trial.
    """

    def __init__(self, path: str | os.PathLike, target: Target | None = None):
        super().__init__()
        self.path = Path(path)
        self.memory = ms.database.MemoryDatabase()
        self.keys: set[str] = set()
        self._threads = (thread_count(target),) if target is not None else None  # None: every count
        self._workload_lines: list[ms.database.Workload] = []  # the workload file, line by line
        self._read = {WORKLOADS: (0, 0), RECORDS: (0, 0), VERIFIED: (0, 0)}  # file -> (bytes read, lines read)
        self._verdicts: dict[int, Verification] = {}  # workload line -> its latest verdict at our thread count
        try:
            with self._locked():
                self._sync()
        except PatDNNError:
            raise
        except Exception as err:  # OSError, TVM's errors on malformed entries
            raise PatDNNError(f"tuning database {self.path} is not readable: {str(err).strip().splitlines()[-1]}") from err

    def _locked(self):
        return directory_lock(self.path)

    def _new_lines(self, name: str) -> list[tuple[int, object]]:
        """Complete lines appended to ``name`` since the last read (under the lock), numbered."""
        file = self.path / name
        offset, count = self._read[name]
        if not file.is_file():
            return []
        with open(file, "rb+") as handle:
            handle.seek(offset)
            data = handle.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a killed writer's torn line: nobody else writes while we hold the lock
                handle.truncate(offset + end)
        lines = []
        for raw in data[:end].split(b"\n")[:-1]:
            if raw.strip():
                try:
                    lines.append((count, json.loads(raw)))
                except json.JSONDecodeError as err:
                    raise PatDNNError(f"{file}: line {count + 1} is not a tuning record ({err.msg})") from None
                count += 1
        self._read[name] = (offset + end, count)
        return lines

    def _sync(self) -> None:
        for _index, entry in self._new_lines(WORKLOADS):
            self._workload_lines.append(self.memory.commit_workload(ms.database.Workload.from_json(entry).mod))
        for number, (index, record) in self._new_lines(RECORDS):
            if not isinstance(index, int) or not 0 <= index < len(self._workload_lines):
                raise PatDNNError(f"{self.path / RECORDS}: record {number + 1} names workload {index}, which does not exist")
            tuning_record = ms.database.TuningRecord.from_json(record, self._workload_lines[index])
            self.keys.add(target_key(tuning_record.target))
            if self._threads is None or thread_count(tuning_record.target) in self._threads:
                self.memory.commit_tuning_record(tuning_record)
        for number, entry in self._new_lines(VERIFIED):
            index, verdict = _verdict(entry, self._workload_lines, f"{self.path / VERIFIED}: line {number + 1}")
            if self._threads is None or thread_count(verdict.record.target) in self._threads:
                self._verdicts[index] = verdict

    def _index(self, workload: ms.database.Workload) -> int | None:
        return next((i for i, w in enumerate(self._workload_lines) if w.same_as(workload)), None)

    def _append(self, name: str, entry: object) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        offset, count = self._read[name]
        self._read[name] = (offset + len(line), count + 1)

    def _file_index(self, workload: ms.database.Workload) -> int:
        """The workload's line in the file, appending it if no writer has (call under the lock)."""
        self._sync()
        index = self._index(workload)
        if index is None:
            index = len(self._workload_lines)
            self._append(WORKLOADS, workload.as_json())
            self._workload_lines.append(workload)
        return index

    def has_workload(self, mod: IRModule) -> bool:
        return self.memory.has_workload(mod)

    def verification(self, mod: IRModule) -> Verification | None:
        """The workload's latest verdict at this database's thread count, if any."""
        if not self.memory.has_workload(mod):
            return None
        index = self._index(self.memory.commit_workload(mod))
        return self._verdicts.get(index) if index is not None else None

    def commit_verification(self, verdict: Verification) -> None:
        """Append a verdict: from now on ``compile`` applies its record to the workload."""
        workload = self.memory.commit_workload(verdict.record.workload.mod)
        with self._locked():
            index = self._file_index(workload)
            self._append(VERIFIED, verdict.as_json(index))
        self._verdicts[index] = verdict

    def commit_workload(self, mod: IRModule) -> ms.database.Workload:
        workload = self.memory.commit_workload(mod)
        if self._index(workload) is None:
            with self._locked():
                self._file_index(workload)
        return workload

    def commit_tuning_record(self, record: ms.database.TuningRecord) -> None:
        workload = self.memory.commit_workload(record.workload.mod)
        with self._locked():
            self._append(RECORDS, [self._file_index(workload), record.as_json()])
        self.keys.add(target_key(record.target))
        self.memory.commit_tuning_record(record)

    def get_top_k(self, workload: ms.database.Workload, top_k: int) -> list[ms.database.TuningRecord]:
        """The best ``top_k`` *searched* records: evolutionary search breeds its population from
        these by mutating their decisions. A default-schedule seed has none to mutate, and its
        fixed unroll annotation (an IntImm, not a sampled value) fails MutateUnroll's check, so
        seeds stay out of the search (they are still records: ``compile`` applies the best)."""
        ranked = self.memory.get_top_k(workload, max(len(self.memory), top_k))
        return [record for record in ranked if len(record.trace.decisions)][:top_k]

    def get_all_tuning_records(self) -> list[ms.database.TuningRecord]:
        return self.memory.get_all_tuning_records()

    def __len__(self) -> int:
        return len(self.memory)


def read_json_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, JSON value) of every complete line; PatDNNError on a corrupt one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise PatDNNError(f"cannot read tuning database file {path}: {err}") from err
    lines = text.split("\n")[:-1]  # a torn last line (no newline) is not a record
    parsed = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                parsed.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise PatDNNError(f"{path}:{number} is not a tuning record ({err.msg})") from None
    return parsed


def record_targets(path: str | os.PathLike) -> set[str]:
    """The target keys of the devices a database directory holds records for."""
    path = Path(path)
    keys = set()
    for number, entry in read_json_lines(path / RECORDS):
        try:
            keys.add(target_key(Target(entry[1][2])))
        except Exception as err:
            raise PatDNNError(f"{path / RECORDS}:{number} is not a tuning record: {err}") from None
    return keys


@dataclass(frozen=True)
class DeviceRecords:
    """One device's records in a database directory: all of them as measured, and, as ``compile``
    applies them, by the thread count they were tuned for (their target's ``num-cores``; None: a
    record that does not say), where a verified workload has only its verdict's record."""

    all: ms.database.MemoryDatabase
    by_threads: dict[int | None, ms.database.MemoryDatabase]

    def ranked(self, threads: int | None) -> list[tuple[int | None, ms.database.MemoryDatabase]]:
        """The record sets to look a kernel up in for a compile for ``threads``, best first
        (:func:`~tvm_patdnn.tuning.threads.preference`)."""
        return [(count, self.by_threads[count]) for count in preference(self.by_threads, threads)]

    def unused(self, threads: int | None) -> list[tuple[int, ms.database.MemoryDatabase]]:
        """The record sets a compile for ``threads`` does not apply (other thread counts), nearest first."""
        return [(count, self.by_threads[count]) for count in not_applied(self.by_threads, threads)]


def load_records(path: str | os.PathLike, target: Target) -> ms.database.MemoryDatabase:
    """The records of ``target``'s device in a database directory, in memory (read only), at
    every thread count."""
    return load_device_records(path, target).all


def load_device_records(path: str | os.PathLike, target: Target) -> DeviceRecords:
    """The records of ``target``'s device in a database directory, in memory (read only), by
    thread count. Cached while the files are unchanged: every ``compile`` reads the shipped database.
    """
    path = Path(path)
    if not path.is_dir():
        raise PatDNNError(f"tuning database {path} does not exist or is not a directory")
    if not (path / WORKLOADS).is_file():
        if (path / KERNEL_CHOICES).is_file():  # a tune of a model whose kernels are all dense-kernel layers
            return DeviceRecords(ms.database.MemoryDatabase(), {})
        raise PatDNNError(f"{path} is not a tuning database (no {WORKLOADS})")
    stamps = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None
                   for f in (path / WORKLOADS, path / RECORDS, path / VERIFIED))
    return _load_records(path.resolve(), stamps, target_key(target))


@functools.lru_cache(maxsize=8)
def _load_records(path: Path, _stamps: tuple, key: str) -> DeviceRecords:
    """In ``by_threads`` (what ``compile`` applies), a workload with a verdict at a thread count
    has that verdict's record (the latest) instead of its records at that count
    (:class:`Verification`); ``all`` holds every record as measured."""
    memory = ms.database.MemoryDatabase()
    by_threads: dict[int | None, ms.database.MemoryDatabase] = {}
    workloads: list[ms.database.Workload] = []

    def add(index: int, record: ms.database.TuningRecord) -> None:
        group = by_threads.setdefault(thread_count(record.target), ms.database.MemoryDatabase())
        group.commit_tuning_record(ms.database.TuningRecord(
            record.trace, group.commit_workload(workloads[index].mod), record.run_secs, record.target,
            record.args_info))

    try:
        for _number, entry in read_json_lines(path / WORKLOADS):
            workloads.append(memory.commit_workload(ms.database.Workload.from_json(entry).mod))
        verdicts: dict[tuple[int, int | None], ms.database.TuningRecord] = {}
        for number, entry in read_json_lines(path / VERIFIED):
            index, verdict = _verdict(entry, workloads, f"{path / VERIFIED}:{number}")
            if target_key(verdict.record.target) == key:
                verdicts[(index, thread_count(verdict.record.target))] = verdict.record
        for number, (index, record) in read_json_lines(path / RECORDS):
            if not 0 <= index < len(workloads):
                raise PatDNNError(f"{path / RECORDS}:{number} names workload {index}, which does not exist")
            tuning_record = ms.database.TuningRecord.from_json(record, workloads[index])
            if target_key(tuning_record.target) == key:
                memory.commit_tuning_record(tuning_record)
                if (index, thread_count(tuning_record.target)) not in verdicts:
                    add(index, tuning_record)
        for (index, _threads), record in verdicts.items():
            add(index, record)
    except PatDNNError:
        raise
    except Exception as err:  # malformed JSON structure: TVM raises its own errors
        raise PatDNNError(f"tuning database {path} is not readable: {str(err).strip().splitlines()[-1]}") from err
    return DeviceRecords(memory, by_threads)


def shipped_database(target: Target) -> Path | None:
    """The database shipped in ``tvm_patdnn/schedules/`` for the target's device, if there is one."""
    path = SCHEDULES_DIR / target_key(target)
    return path if (path / WORKLOADS).is_file() else None


@dataclass
class ScheduleSource:
    """Which tuning records ``compile`` applied and how many of the model's kernels they
    scheduled: a tuned database that silently covers nothing (another CPU's, another model's)
    looks like a slow compiler, so the user is told once."""

    target_key: str
    path: Path | None = None  # None: no database (none shipped for the device, or not wanted)
    shipped: bool = False
    wanted: bool = True  # False: tuning_db=False / --no-tuned-schedules
    held: tuple[str, ...] = ()  # the devices the database has records for
    applied: int = 0
    kernels: int = 0
    kernel_choices: KernelChoices | None = None  # the database's dense kernel choices (tuning.kernel_records)
    threads: int | None = None  # the thread count compiled for (the target's num-cores)
    # kernels scheduled by records of another thread count than ``threads`` (None: records that do not say)
    other_threads: dict[int | None, int] = field(default_factory=dict)
    # kernels left to the default rules that have records only for these other thread counts
    unused_threads: dict[int, int] = field(default_factory=dict)
    # dense layer -> the thread count its applied choice was measured at; for a layer measured only at
    # counts that are not applied, the nearest of those
    dense_threads: dict[str, int | None] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.wanted:
            return "tuning records: not used (default schedule rules)"
        if self.path is None:
            return (f"no shipped schedules for {self.target_key}: default schedule rules; "
                    "`patdnn tune` adds them")
        where = f"schedules/{self.path.name}" if self.shipped else str(self.path)
        dense = ""
        if self.kernel_choices is not None and self.kernel_choices.applied:
            dense = (f"; dense kernels: {len(self.kernel_choices.applied)}/{len(self.kernel_choices.seen)} "
                     "layer(s) on their measured choice")
        if self.target_key not in self.held:
            return (f"tuning records: none for {self.target_key} in {where} (it holds: "
                    f"{', '.join(self.held) or 'no records'}): default schedule rules{dense}")
        return f"tuning records: {self.applied}/{self.kernels} kernels from {where}{dense}{self._other_threads()}"

    def _other_threads(self) -> str:
        """Records of another thread count than the one compiled for: applied (unrecorded counts, or
        a target without num-cores) or not (another count), if any."""
        choices = self.kernel_choices
        dense: dict[int | None, int] = {}
        dense_unused: dict[int, int] = {}
        for layer in choices.seen if choices is not None else ():
            count = self.dense_threads.get(layer, self.threads)
            if layer in choices.applied and count != self.threads:
                dense[count] = dense.get(count, 0) + 1
            elif layer not in choices.chosen and count != self.threads and count is not None:
                dense_unused[count] = dense_unused.get(count, 0) + 1
        parts = [f"{kernels} kernel(s) tuned for {describe(count)}"
                 for count, kernels in sorted(self.other_threads.items(), key=str)]
        parts += [f"{layers} dense layer(s) measured at {describe(count)}" for count, layers in
                  sorted(dense.items(), key=str)]
        unused: dict[int, list[str]] = {}  # each count's kernels and dense layers, named with that count
        for count, kernels in self.unused_threads.items():
            unused.setdefault(count, []).append(f"{kernels} kernel(s)")
        for count, layers in dense_unused.items():
            unused.setdefault(count, []).append(f"{layers} dense layer(s)")
        notes = []
        if parts and self.threads is None:
            notes.append(f"{', '.join(parts)}; the target has no num-cores: compile with threads= to match records "
                         "to it")
        elif parts:
            notes.append(f"{', '.join(parts)}, compiling for {describe(self.threads)}")
        if unused:
            per_count = "; ".join(f"{' and '.join(what)} tuned only for {describe(count)}"
                                  for count, what in sorted(unused.items()))
            notes.append(f"not applied: {per_count}, compiling for {describe(self.threads)}; "
                         f"`patdnn tune --threads {self.threads}` measures its own")
        return "".join(f" ({note})" for note in notes)


def apply_tuning_records(database: ms.database.Database | DeviceRecords,
                         source: ScheduleSource | None = None) -> tvm.transform.Pass:
    """Schedule every PrimFunc the database has a record for (its best one); leave the rest.

    Like meta_schedule's ApplyDatabase, but the function keeps its own attributes (no
    ``global_symbol`` it did not have) and gets the compiler's post-schedule rewrites.
    ``source`` counts the kernels (PrimFuncs that run, not reshape views) and those scheduled.
    A record whose trace no longer replays on its workload (tuned with an older design space)
    leaves its kernel to the default rules, like a kernel without records. With
    :class:`DeviceRecords`, a kernel takes the best record of the first thread count in
    :meth:`DeviceRecords.ranked` order for the target's count that has one; ``source`` counts the
    kernels scheduled by records of another count than the target's, and those left to the default
    rules that have records only at other counts.
    """

    @tvm.transform.module_pass(opt_level=0, name="PatDNNApplyTuningRecords")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = Target.current()
        threads = thread_count(target)
        ranked = database.ranked(threads) if isinstance(database, DeviceRecords) else [(threads, database)]
        unused = database.unused(threads) if isinstance(database, DeviceRecords) else []
        updates = {}
        other: dict[int | None, int] = {}
        elsewhere: dict[int, int] = {}
        kernels = 0
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            if not relax.analysis.has_reshape_pattern(func):
                kernels += 1
            sch, tuned_for = None, threads
            for tuned_for, records in ranked:
                try:
                    sch = records.query_schedule(normalize(func), target, gvar.name_hint)
                except Exception:  # noqa: BLE001 - a record that no longer replays (older space): default rule
                    sch = None
                if sch is not None:
                    break
            if sch is None:
                count = next((count for count, records in unused if records.has_workload(normalize(func))), None)
                if count is not None:
                    elsewhere[count] = elsewhere.get(count, 0) + 1
                continue
            if tuned_for != threads:
                other[tuned_for] = other.get(tuned_for, 0) + 1
            tuned = sch.mod["main"].without_attr("global_symbol")
            for attr_key, value in func.attrs.items():
                tuned = tuned.with_attr(attr_key, value)
            updates[gvar] = finish_schedule(tuned).with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        if source is not None:
            source.applied, source.kernels, source.threads = len(updates), kernels, threads
            source.other_threads, source.unused_threads = other, elsewhere
        return mod

    return _apply


def tuning_records_pass(tuning_db: str | os.PathLike | bool | None, target: Target) -> tuple[tvm.transform.Pass | None, ScheduleSource]:
    """``compile``'s ``tuning_db``: a directory, None (the database shipped for the target's
    device, if any) or False (none) -> the pass applying its records (for the target's thread
    count first), and what it applied."""
    key = target_key(target)
    threads = thread_count(target)
    if tuning_db is False:
        return None, ScheduleSource(key, wanted=False, threads=threads)
    path = shipped_database(target) if tuning_db is None else Path(tuning_db)
    if path is None:
        return None, ScheduleSource(key, threads=threads)
    records = load_device_records(path, target)
    # Reading every record's target costs ~0.2 s per compile: only when none is the target's.
    held = (key,) if len(records.all) else tuple(sorted(record_targets(path)))
    source = ScheduleSource(key, path, shipped=tuning_db is None, held=held, threads=threads)
    return apply_tuning_records(records, source), source
