"""Tuning records on disk: meta_schedule's JSONDatabase format, one directory per device.

A database directory holds ``database_workload.json`` and ``database_tuning_record.json``, one
JSON document per line, only ever appended to (meta_schedule opens, appends one line and closes
per record), so a killed tune loses at most the line being written. That torn last line is the
one thing dropped when a tune reopens the database; readers (``compile``) skip it.

Records carry their target. ``compile`` applies only records whose target key (kind, triple,
CPU, features; not the core count) matches its own: a record tuned for one CPU says nothing
about another. Shipped databases are package data, ``tvm_patdnn/schedules/<target key>/``, so
a wheel install has them too.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import PatDNNError
from .measure import finish_schedule
from .tasks import normalize

__all__ = [
    "RECORDS",
    "SCHEDULES_DIR",
    "ScheduleSource",
    "WORKLOADS",
    "apply_tuning_records",
    "load_records",
    "open_for_tuning",
    "record_targets",
    "shipped_database",
    "target_key",
    "tuning_records_pass",
]

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
SCHEDULES_DIR = Path(str(importlib.resources.files("tvm_patdnn") / "schedules"))


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


def _drop_torn_line(path: Path) -> None:
    """Cut a last line a killed writer left without its newline (it holds no complete record)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)


def open_for_tuning(path: str | os.PathLike, target: Target) -> ms.database.JSONDatabase:
    """Open (creating it) a database directory to append records for ``target``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in (WORKLOADS, RECORDS):
            _drop_torn_line(path / name)
    except OSError as err:
        raise PatDNNError(f"cannot use tuning database {path}: {err}") from err
    foreign = {key for key in record_targets(path) if key != target_key(target)}
    if foreign:
        raise PatDNNError(
            f"tuning database {path} holds records for {', '.join(sorted(foreign))}, not {target_key(target)}: "
            "use one database directory per device"
        )
    try:
        return ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS), allow_missing=True)
    except Exception as err:  # TVM's JSON parser errors
        raise PatDNNError(f"tuning database {path} is not readable: {str(err).strip().splitlines()[-1]}") from err


def _lines(path: Path) -> list[tuple[int, object]]:
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
    for number, entry in _lines(path / RECORDS):
        try:
            keys.add(target_key(Target(entry[1][2])))
        except Exception as err:
            raise PatDNNError(f"{path / RECORDS}:{number} is not a tuning record: {err}") from None
    return keys


def load_records(path: str | os.PathLike, target: Target) -> ms.database.MemoryDatabase:
    """The records of ``target``'s device in a database directory, in memory (read only).

    Cached while the files are unchanged: every ``compile`` reads the shipped database.
    """
    path = Path(path)
    if not path.is_dir():
        raise PatDNNError(f"tuning database {path} does not exist or is not a directory")
    if not (path / WORKLOADS).is_file():
        raise PatDNNError(f"{path} is not a tuning database (no {WORKLOADS})")
    stamps = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None
                   for f in (path / WORKLOADS, path / RECORDS))
    return _load_records(path.resolve(), stamps, target_key(target))


@functools.lru_cache(maxsize=8)
def _load_records(path: Path, _stamps: tuple, key: str) -> ms.database.MemoryDatabase:
    memory = ms.database.MemoryDatabase()
    workloads = []
    try:
        for _number, entry in _lines(path / WORKLOADS):
            workloads.append(memory.commit_workload(ms.database.Workload.from_json(entry).mod))
        for number, (index, record) in _lines(path / RECORDS):
            if not 0 <= index < len(workloads):
                raise PatDNNError(f"{path / RECORDS}:{number} names workload {index}, which does not exist")
            tuning_record = ms.database.TuningRecord.from_json(record, workloads[index])
            if target_key(tuning_record.target) == key:
                memory.commit_tuning_record(tuning_record)
    except PatDNNError:
        raise
    except Exception as err:  # malformed JSON structure: TVM raises its own errors
        raise PatDNNError(f"tuning database {path} is not readable: {str(err).strip().splitlines()[-1]}") from err
    return memory


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

    def __str__(self) -> str:
        if not self.wanted:
            return "tuning records: not used (default schedule rules)"
        if self.path is None:
            return (f"no shipped schedules for {self.target_key}: default schedule rules; "
                    "`patdnn tune` adds them")
        where = f"schedules/{self.path.name}" if self.shipped else str(self.path)
        if self.target_key not in self.held:
            return (f"tuning records: none for {self.target_key} in {where} (it holds: "
                    f"{', '.join(self.held) or 'no records'}): default schedule rules")
        return f"tuning records: {self.applied}/{self.kernels} kernels from {where}"


def apply_tuning_records(database: ms.database.Database, source: ScheduleSource | None = None) -> tvm.transform.Pass:
    """Schedule every PrimFunc the database has a record for (its best one); leave the rest.

    Like meta_schedule's ApplyDatabase, but the function keeps its own attributes (no
    ``global_symbol`` it did not have) and gets the compiler's post-schedule rewrites.
    ``source`` counts the kernels (PrimFuncs that run, not reshape views) and those scheduled.
    """

    @tvm.transform.module_pass(opt_level=0, name="PatDNNApplyTuningRecords")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = Target.current()
        updates = {}
        kernels = 0
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            if not relax.analysis.has_reshape_pattern(func):
                kernels += 1
            sch = database.query_schedule(normalize(func), target, gvar.name_hint)
            if sch is None:
                continue
            tuned = sch.mod["main"].without_attr("global_symbol")
            for attr_key, value in func.attrs.items():
                tuned = tuned.with_attr(attr_key, value)
            updates[gvar] = finish_schedule(tuned).with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        if source is not None:
            source.applied, source.kernels = len(updates), kernels
        return mod

    return _apply


def tuning_records_pass(tuning_db: str | os.PathLike | bool | None, target: Target) -> tuple[tvm.transform.Pass | None, ScheduleSource]:
    """``compile``'s ``tuning_db``: a directory, None (the database shipped for the target's
    device, if any) or False (none) -> the pass applying its records, and what it applied."""
    key = target_key(target)
    if tuning_db is False:
        return None, ScheduleSource(key, wanted=False)
    path = shipped_database(target) if tuning_db is None else Path(tuning_db)
    if path is None:
        return None, ScheduleSource(key)
    records = load_records(path, target)
    # Reading every record's target costs ~0.2 s per compile: only when none is the target's.
    held = (key,) if len(records.get_all_tuning_records()) else tuple(sorted(record_targets(path)))
    source = ScheduleSource(key, path, shipped=tuning_db is None, held=held)
    return apply_tuning_records(records, source), source
