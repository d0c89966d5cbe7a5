"""Shipped schedules: package data a wheel carries, and compile says what it applied.

A tuned database that silently covers nothing (another CPU's, another model's, or missing from
a non-editable install) looks like a slow compiler; these tests hold compile to telling the user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn

import tvm_patdnn
from benchmarks.models import twins
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.tuning.database import SCHEDULES_DIR, shipped_database, target_key

ROOT = Path(__file__).resolve().parents[1]
PATDNN = Path(sys.executable).parent / "patdnn"
SHIPPED_KEY = "llvm-znver3"  # the database shipped in the repository (VGG-16 CIFAR, Zen 3)


def small_model() -> onnx.ModelProto:
    return build_cnn(np.random.default_rng(7), (1, 4, 12, 12), [ConvSpec(8, kind="dense"), ConvSpec(16, connectivity=2.0)])


def test_a_wheel_carries_the_shipped_databases_and_reads_them_from_where_it_is_installed(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT / "tvm_patdnn", source / "tvm_patdnn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("tvm_patdnn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in [*SCHEDULES_DIR.glob("*/database_*.json"), *SCHEDULES_DIR.glob("*/dense_kernels.json"),
                    *SCHEDULES_DIR.glob("*/verified.json")]:
        assert f"tvm_patdnn/schedules/{shipped.parent.name}/{shipped.name}" in names

    installed = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "-q", "--target", str(installed)],
                   check=True, capture_output=True, timeout=300)
    probe = ("from tvm_patdnn.tuning.database import SCHEDULES_DIR, WORKLOADS; "
             f"print(SCHEDULES_DIR); assert (SCHEDULES_DIR / {SHIPPED_KEY!r} / WORKLOADS).is_file()")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(installed)}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert Path(shown.stdout.strip()) == installed / "tvm_patdnn" / "schedules"


def test_compile_says_which_records_it_applied_to_how_many_kernels():
    model = small_model()
    shipped_target = resolve_target('{"kind":"llvm","mcpu":"znver3","num-cores":2}')
    assert shipped_database(shipped_target) is not None
    compiled = tvm_patdnn.compile(model, shipped_target)
    # one tunable kernel: the pattern conv (the dense conv runs on the direct kernel, written as scheduled TIR)
    assert str(compiled.schedules) == f"tuning records: 0/1 kernels from schedules/{SHIPPED_KEY}"
    assert compiled.format_report().endswith(str(compiled.schedules))

    other = resolve_target('{"kind":"llvm","mcpu":"haswell"}')
    assert str(tvm_patdnn.compile(model, other).schedules) == (
        "no shipped schedules for llvm-haswell: default schedule rules; `patdnn tune` adds them")
    assert str(tvm_patdnn.compile(model, other, tuning_db=False).schedules) == (
        "tuning records: not used (default schedule rules)")
    foreign = tvm_patdnn.compile(model, other, tuning_db=SCHEDULES_DIR / SHIPPED_KEY)
    assert str(foreign.schedules) == (
        f"tuning records: none for llvm-haswell in {SCHEDULES_DIR / SHIPPED_KEY} (it holds: {SHIPPED_KEY}): "
        "default schedule rules")


def test_the_cli_prints_the_schedule_source_once_and_can_turn_records_off(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    target = '{"kind":"llvm","mcpu":"znver3"}'
    with_records = subprocess.run([str(PATDNN), "compile", str(path), "--target", target, "-o", str(tmp_path / "a.so")],
                                  capture_output=True, text=True, timeout=300)
    assert with_records.returncode == 0, with_records.stderr
    assert with_records.stderr.count("tuning records:") == 1
    assert f"0/1 kernels from schedules/{SHIPPED_KEY}" in with_records.stderr

    without = subprocess.run([str(PATDNN), "compile", str(path), "--target", target, "-o", str(tmp_path / "b.so"),
                              "--no-tuned-schedules"], capture_output=True, text=True, timeout=300)
    assert without.returncode == 0, without.stderr
    assert "tuning records: not used" in without.stderr

    both = subprocess.run([str(PATDNN), "compile", str(path), "-o", str(tmp_path / "c.so"), "--no-tuned-schedules",
                           "--tuning-db", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_the_shipped_records_cover_every_kernel_of_the_model_they_were_tuned_for():
    """A change to a kernel's code (layout, operator) silently leaves the shipped records matching
    nothing: re-tune them (`.venv/bin/python -m benchmarks.vgg16_cifar --target x86 --trials 320`
    on the device of the key, into an emptied directory) with the change."""
    compiled = tvm_patdnn.compile(twins("vgg16_cifar").pruned, resolve_target('{"kind":"llvm","mcpu":"znver3"}'))
    # 6 pattern convs are tuning tasks (the three 2x2 and, since session 11, the three 4x4 ones run
    # scheduled kernels: pattern_conv_2x2, pattern_conv_shifted_rows); session 12 re-tuned them with the
    # verifying tuner (the old records replayed the register tile's "local" scope and lost to the
    # default): every verdict kept the default, so all 6 apply their verdict's record, the default's trace
    assert compiled.schedules.kernels == 6 and compiled.schedules.applied == 6, str(compiled.schedules)


@pytest.mark.parametrize("spec", ['{"kind":"llvm","mcpu":"znver3"}', '{"kind":"llvm","mcpu":"znver3","num-cores":2}'])
def test_the_shipped_key_ignores_the_core_count(spec):
    assert target_key(resolve_target(spec)) == SHIPPED_KEY
