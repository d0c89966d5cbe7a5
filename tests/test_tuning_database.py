"""The tuning database on disk: concurrent writers, torn lines, foreign devices, target filtering,
thread counts.

Fast tests on real files: records are made from tiny PrimFuncs with their untuned schedule, no
tuning or measuring involved.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tvm import s_tir, te
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from tvm_patdnn import PatDNNError
from tvm_patdnn.tuning.database import (
    RECORDS,
    VERIFIED,
    WORKLOADS,
    AppendOnlyDatabase,
    ScheduleSource,
    Verification,
    load_device_records,
    load_records,
    open_for_tuning,
)
from tvm_patdnn.tuning.tasks import normalize

ZEN3 = Target({"kind": "llvm", "mcpu": "znver3"})
HASWELL = Target({"kind": "llvm", "mcpu": "haswell"})

# One writer process: commits a workload of its own and one shared with the other writer, then
# N records alternating between them, each record's run time naming the workload it belongs to
# (own: size, shared: 1000 + size), so a record attached to the wrong workload is detectable.
WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_tuning_database import ZEN3, add_one, record
from tvm_patdnn.tuning.database import open_for_tuning
db = open_for_tuning(Path(sys.argv[1]), ZEN3)
size, count = int(sys.argv[2]), int(sys.argv[3])
own, shared = add_one(size), add_one(7)
for i in range(count):
    mod, seconds = (own, size) if i % 2 == 0 else (shared, 1000 + size)
    db.commit_tuning_record(record(db, mod, seconds))
"""


def add_one(size: int):
    data = te.placeholder((size,), name="data")
    return normalize(te.create_prim_func([data, te.compute((size,), lambda i: data[i] + 1.0, name="out")]))


def record(db, mod, seconds: float, target: Target = ZEN3) -> ms.database.TuningRecord:
    workload = db.commit_workload(mod)
    return ms.database.TuningRecord(s_tir.Schedule(mod).trace, workload, [float(seconds)], target,
                                    ms.arg_info.ArgInfo.from_prim_func(mod["main"]))


def seconds_by_size(database) -> dict[int, set[float]]:
    """Run times of the records per workload, keyed by the workload's buffer size."""
    found: dict[int, set[float]] = {}
    for r in database.get_all_tuning_records():
        size = int(r.args_info[0].shape[0])
        found.setdefault(size, set()).add(float(r.run_secs[0]))
    return found


def test_two_writer_processes_leave_every_line_whole_and_every_record_on_its_workload(tmp_path):
    db_dir = tmp_path / "db"
    open_for_tuning(db_dir, ZEN3)
    script = WRITER.format(tests=str(Path(__file__).parent))
    count = 400
    writers = [subprocess.Popen([sys.executable, "-c", script, str(db_dir), str(size), str(count)])
               for size in (3, 5)]
    assert [w.wait(timeout=600) for w in writers] == [0, 0]

    for name in (WORKLOADS, RECORDS):
        lines = (db_dir / name).read_text().split("\n")
        assert lines[-1] == ""
        for line in lines[:-1]:
            json.loads(line)  # every line is one whole JSON document
    assert len((db_dir / WORKLOADS).read_text().splitlines()) == 3  # own x2 + the shared one, once
    expected = {3: {3.0}, 5: {5.0}, 7: {1003.0, 1005.0}}
    assert seconds_by_size(load_records(db_dir, ZEN3)) == expected
    assert seconds_by_size(AppendOnlyDatabase(db_dir)) == expected
    assert len(AppendOnlyDatabase(db_dir)) == 2 * count


def test_a_torn_last_line_is_ignored_by_readers_and_cut_by_the_next_writer(tmp_path):
    db_dir = tmp_path / "db"
    db = open_for_tuning(db_dir, ZEN3)
    db.commit_tuning_record(record(db, add_one(4), 1.0))
    with open(db_dir / RECORDS, "a") as handle:
        handle.write('[0,[[["GetSBlock"')  # a writer killed mid-line
    assert len(load_records(db_dir, ZEN3).get_all_tuning_records()) == 1
    db = open_for_tuning(db_dir, ZEN3)
    db.commit_tuning_record(record(db, add_one(4), 2.0))
    assert sorted(seconds_by_size(load_records(db_dir, ZEN3))[4]) == [1.0, 2.0]
    assert (db_dir / RECORDS).read_text().count("GetSBlock\"\n") == 0


def test_records_of_another_device_are_refused_for_tuning_and_ignored_by_compile(tmp_path):
    db_dir = tmp_path / "db"
    db = open_for_tuning(db_dir, HASWELL)
    db.commit_tuning_record(record(db, add_one(4), 1.0, HASWELL))
    with pytest.raises(PatDNNError, match="holds records for llvm-haswell, not llvm-znver3"):
        open_for_tuning(db_dir, ZEN3)
    assert load_records(db_dir, ZEN3).get_all_tuning_records() == []
    assert len(load_records(db_dir, HASWELL).get_all_tuning_records()) == 1


def test_a_record_naming_a_missing_workload_is_a_clear_error(tmp_path):
    db_dir = tmp_path / "db"
    db = open_for_tuning(db_dir, ZEN3)
    db.commit_tuning_record(record(db, add_one(4), 1.0))
    line = (db_dir / RECORDS).read_text()
    (db_dir / RECORDS).write_text(line.replace("[0,", "[9,", 1))
    with pytest.raises(PatDNNError, match="names workload 9, which does not exist"):
        load_records(db_dir, ZEN3)
    with pytest.raises(PatDNNError, match="names workload 9, which does not exist"):
        open_for_tuning(db_dir, ZEN3)



def zen3(threads: int) -> Target:
    return Target({"kind": "llvm", "mcpu": "znver3", "num-cores": threads})


def test_records_are_grouped_by_thread_count_and_old_records_without_one_still_load(tmp_path):
    """A record's thread count is its target's num-cores; records without one (tuned before the
    count was recorded, or for a target without num-cores) load as 'unrecorded'."""
    db_dir = tmp_path / "db"
    for target, seconds in ((ZEN3, 3.0), (zen3(1), 1.0), (zen3(2), 2.0), (zen3(2), 2.5)):
        db = open_for_tuning(db_dir, target)  # one directory per device, any thread count
        db.commit_tuning_record(record(db, add_one(4), seconds, target))
    records = load_device_records(db_dir, zen3(2))
    assert {count: sorted(seconds_by_size(group)[4]) for count, group in records.by_threads.items()} == {
        None: [3.0], 1: [1.0], 2: [2.0, 2.5]}
    assert len(records.all) == len(load_records(db_dir, ZEN3)) == 4
    # compile takes its own count, then unrecorded; never another count, unless the target has none
    assert [count for count, _ in records.ranked(2)] == [2, None]
    assert [count for count, _ in records.ranked(4)] == [None]
    assert [count for count, _ in records.ranked(None)] == [None, 1, 2]
    assert [count for count, _ in records.unused(4)] == [2, 1] and records.unused(None) == []
    # a tune sees only its own count's trials; every record's device is known
    tuning = open_for_tuning(db_dir, zen3(2))
    assert sorted(seconds_by_size(tuning)[4]) == [2.0, 2.5] and tuning.keys == {"llvm-znver3"}
    assert len(AppendOnlyDatabase(db_dir)) == 4


def test_compile_says_which_kernels_had_records_of_another_thread_count():
    source = ScheduleSource("llvm-znver3", Path("db"), held=("llvm-znver3",), applied=0, kernels=9, threads=2,
                            unused_threads={1: 9})
    assert str(source) == ("tuning records: 0/9 kernels from db (not applied: 9 kernel(s) tuned only for 1 thread, "
                           "compiling for 2 threads; `patdnn tune --threads 2` measures its own)")
    source.unused_threads = {4: 2, 1: 3}  # each count names its own kernels
    assert str(source).endswith("(not applied: 3 kernel(s) tuned only for 1 thread; 2 kernel(s) tuned only for "
                                "4 threads, compiling for 2 threads; `patdnn tune --threads 2` measures its own)")
    source.other_threads, source.unused_threads, source.threads = {None: 3}, {}, 1
    assert str(source).endswith("(3 kernel(s) tuned for an unrecorded thread count, compiling for 1 thread)")
    source.other_threads, source.threads = {4: 9}, None
    assert str(source).endswith("(9 kernel(s) tuned for 4 threads; the target has no num-cores: compile with "
                                "threads= to match records to it)")


def dense_choice(line: dict):
    from tvm_patdnn.transform.kernel_choice import KernelChoice, layer_spec

    return KernelChoice.from_json(line["choice"], layer_spec(line["layer"]))


VGG_CONV1 = {"activation": "relu", "batch": 1, "clip_max": 0.0, "clip_min": 0.0, "has_bias": True, "height": 32,
             "in_channels": 3, "kernel": [3, 3], "out_channels": 64, "padding": [1, 1, 1, 1], "residual": False,
             "strides": [1, 1], "width": 32}  # VGG-16 CIFAR's first conv, as a 1-thread tune records it


@pytest.mark.filterwarnings("ignore:.*not verified")  # unverified choices: test_a_dense_verdict_decides...
def test_dense_kernel_choices_are_taken_from_the_compiles_thread_count(tmp_path):
    """dense_kernels.json lines say their count; lines without one (older tunes) serve any count;
    another count's measurements are not applied, and the report knows the nearest of them."""
    from tvm_patdnn.tuning.database import KERNEL_CHOICES
    from tvm_patdnn.tuning.kernel_records import load_kernel_choices

    recorded = [{"target": "llvm-znver3", "threads": 1, "layer": VGG_CONV1, "choice": chosen, "ms": ms} for chosen, ms in (
        ({"kernel": "gemm", "params": {"filter_tile": 6, "vectors": 2, "lanes": 8, "pack_panel": True,
                                       "filters_outer": False}}, 0.093),
        ({"kernel": "gemm", "params": {"filter_tile": 13, "vectors": 1, "lanes": 8, "pack_panel": True,
                                       "filters_outer": False}}, 0.202),
        ({"kernel": "direct", "params": {"pixel_tile": 6, "vectors": 2, "lanes": 8, "filters_inner": True,
                                         "weight_panel": 32768}}, 0.108))]
    fastest = min(recorded, key=lambda line: line["ms"])
    slowest = max(recorded, key=lambda line: line["ms"])
    lines = [*recorded, {**slowest, "threads": 2, "ms": 0.01}]  # at 2 threads another kernel wins
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    (db_dir / KERNEL_CHOICES).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (layer,) = {json.dumps(line["layer"], sort_keys=True) for line in recorded}

    for threads, winner in ((1, fastest), (2, slowest)):
        choices, measured_at = load_kernel_choices(db_dir, zen3(threads))
        assert choices.chosen[layer] == dense_choice(winner) and measured_at == {layer: threads}
    choices, measured_at = load_kernel_choices(db_dir, zen3(4))
    assert choices.chosen == {} and measured_at == {layer: 2}  # nearest of the counts not applied
    unrecorded = [{k: v for k, v in line.items() if k != "threads"} for line in recorded]
    (db_dir / KERNEL_CHOICES).write_text("".join(json.dumps(line) + "\n" for line in lines + unrecorded))
    choices, measured_at = load_kernel_choices(db_dir, zen3(4))
    assert choices.chosen[layer] == dense_choice(fastest) and measured_at == {layer: None}


def test_a_dense_verdict_decides_the_choice_over_faster_single_measurements(tmp_path):
    """A layer with a verdict runs its latest verdict's choice (a "default kept" verdict: the rules'),
    whatever measured faster once; a layer without one (another thread count here) runs its fastest
    measurement, with a warning when that is not the rules' choice; a torn verdict line is skipped."""
    from tvm_patdnn.targets import vector_lanes, vector_registers
    from tvm_patdnn.transform.kernel_choice import KernelChoice, layer_spec
    from tvm_patdnn.transform.winograd_conv_rewrite import WinogradConvRewriter
    from tvm_patdnn.tuning.database import KERNEL_CHOICES
    from tvm_patdnn.tuning.kernel_records import DenseVerdict, commit_verdict, load_kernel_choices

    layer = layer_spec(VGG_CONV1)
    rewriter = WinogradConvRewriter(vector_registers(ZEN3), vector_lanes(ZEN3))
    default, fastest, verified = (KernelChoice.of(spec) for spec in rewriter.candidates(layer)[:3])
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    lines = [{"target": "llvm-znver3", "threads": threads, "layer": VGG_CONV1, "choice": chosen.as_json(), "ms": ms}
             for threads in (1, 2) for chosen, ms in ((default, 0.1), (fastest, 0.05), (verified, 0.07))]
    (db_dir / KERNEL_CHOICES).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (key,) = {json.dumps(VGG_CONV1, sort_keys=True)}

    def chosen(threads: int) -> dict:
        return load_kernel_choices(db_dir, zen3(threads))[0].chosen

    with pytest.warns(UserWarning, match="1 dense layer.* measured once, not verified"):
        assert chosen(1) == {key: fastest}
    for kept, expected in ((True, {key: verified}), (False, {key: default})):
        commit_verdict(db_dir, zen3(1), layer, DenseVerdict(default, verified, kept, 1.1 if kept else 0.9, (0.1,),
                                                            (0.09,), 3))
        assert chosen(1) == expected
    with open(db_dir / KERNEL_CHOICES, "a") as handle:
        handle.write('{"target": "llvm-znver3", "threads": 1, "layer": {"acti')  # a writer killed mid-line
    assert chosen(1) == {key: default} and load_kernel_choices(db_dir, zen3(1))[1] == {key: 1}
    with pytest.warns(UserWarning, match="not verified"):
        assert chosen(2) == {key: fastest}  # the verdicts are 1-thread ones


def test_reading_or_writing_a_database_leaves_no_lock_file(tmp_path):
    """The writers' lock is a flock of the directory itself: reading the shipped database through
    AppendOnlyDatabase (as benchmarks.tuning --shipped does) leaves schedules/ as shipped, and a
    tune's directory holds its JSON files only."""
    from tvm_patdnn.tuning.database import SCHEDULES_DIR

    shipped = SCHEDULES_DIR / "llvm-znver3"
    before = sorted(p.name for p in shipped.iterdir())
    AppendOnlyDatabase(shipped, zen3(1))
    assert sorted(p.name for p in shipped.iterdir()) == before
    db = open_for_tuning(tmp_path / "db", ZEN3)
    db.commit_tuning_record(record(db, add_one(4), 1.0))
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == sorted([RECORDS, WORKLOADS])


def verdict(db, mod, seconds: float, target: Target, kept: bool = True) -> Verification:
    return Verification(record(db, mod, seconds, target), "add_one", kept, 1.2 if kept else 0.9, (1.2,), (1.0,), 1)


def test_a_verdict_decides_the_applied_record_at_its_thread_count_and_survives_a_torn_line(tmp_path):
    """compile applies a workload's latest verdict, not its fastest record, at the verdict's thread
    count only (the records stay, as measured); a torn verdict line is skipped by readers and cut by
    the next writer."""
    db_dir = tmp_path / "db"
    db = open_for_tuning(db_dir, zen3(1))
    mod = add_one(4)
    db.commit_tuning_record(record(db, mod, 1.0, zen3(1)))  # the fastest record: what applies unverified
    db.commit_verification(verdict(db, mod, 5.0, zen3(1), kept=False))
    db.commit_verification(verdict(db, mod, 4.0, zen3(1)))  # the latest verdict wins
    other = open_for_tuning(db_dir, zen3(2))
    other.commit_tuning_record(record(other, mod, 3.0, zen3(2)))
    with open(db_dir / VERIFIED, "a") as handle:
        handle.write('{"workload": 0, "kernel": "add')  # a writer killed mid-line

    records = load_device_records(db_dir, zen3(1))
    assert {count: sorted(seconds_by_size(group)[4]) for count, group in records.by_threads.items()} == {
        1: [4.0], 2: [3.0]}
    assert sorted(seconds_by_size(records.all)[4]) == [1.0, 3.0]  # every record as measured
    reopened = open_for_tuning(db_dir, zen3(1))
    assert float(reopened.verification(mod).record.run_secs[0]) == 4.0 and reopened.verification(mod).kept
    assert open_for_tuning(db_dir, zen3(2)).verification(mod) is None
    assert sorted(seconds_by_size(reopened)[4]) == [1.0]  # the search sees its own records only
    reopened.commit_verification(verdict(reopened, mod, 6.0, zen3(1)))
    assert (db_dir / VERIFIED).read_text().count('"add\n') == 0
    assert seconds_by_size(load_device_records(db_dir, zen3(1)).by_threads[1]) == {4: {6.0}}
