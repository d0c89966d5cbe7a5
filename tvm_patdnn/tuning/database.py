"""Tuning records on disk: meta_schedule's JSONDatabase format, one directory per device.

A database directory holds ``database_workload.json`` and ``database_tuning_record.json``, one
JSON document per line, only ever appended to (meta_schedule opens, appends one line and closes
per record), so a killed tune loses at most the line being written. That torn last line is the
one thing dropped when a tune reopens the database; readers (``compile``) skip it.

Records carry their target. ``compile`` applies only records whose target key (kind, triple,
CPU, features; not the core count) matches its own: a record tuned for one CPU says nothing
about another. Shipped databases live in ``schedules/<target key>/`` at the project root.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import PatDNNError
from .measure import finish_schedule
from .tasks import normalize

__all__ = [
    "RECORDS",
    "SCHEDULES_DIR",
    "WORKLOADS",
    "apply_tuning_records",
    "load_records",
    "open_for_tuning",
    "shipped_database",
    "target_key",
]

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
SCHEDULES_DIR = Path(__file__).resolve().parents[2] / "schedules"


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
    foreign = {key for key in _record_targets(path) if key != target_key(target)}
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


def _record_targets(path: Path) -> set[str]:
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
    """The database shipped in ``schedules/`` for the target's device, if there is one."""
    path = SCHEDULES_DIR / target_key(target)
    return path if (path / WORKLOADS).is_file() else None


def apply_tuning_records(database: ms.database.Database) -> tvm.transform.Pass:
    """Schedule every PrimFunc the database has a record for (its best one); leave the rest.

    Like meta_schedule's ApplyDatabase, but the function keeps its own attributes (no
    ``global_symbol`` it did not have) and gets the compiler's post-schedule rewrites.
    """

    @tvm.transform.module_pass(opt_level=0, name="PatDNNApplyTuningRecords")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = Target.current()
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            sch = database.query_schedule(normalize(func), target, gvar.name_hint)
            if sch is None:
                continue
            tuned = sch.mod["main"].without_attr("global_symbol")
            for attr_key, value in func.attrs.items():
                tuned = tuned.with_attr(attr_key, value)
            updates[gvar] = finish_schedule(tuned).with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _apply
