"""Tuning on the emulated aarch64 phone through a real RPC tracker (RPCRunner), then running the
tuned, cross-compiled model there against the ONNX reference. Two trials: qemu is slow."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import ConvSpec, build_cnn
from test_phone_emulator import HOST, _start_emulator, _stop_group, tracker_port  # noqa: F401

import tvm_patdnn
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.tuning.database import load_records, target_key

KEY = "android-tune"
TARGET = "arm_cpu-linux"  # glibc aarch64: what the Debian cross compiler links for the emulator


@pytest.fixture(scope="module")
def emulator(tracker_port: int, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    proc = _start_emulator(tracker_port, KEY, tmp_path_factory.mktemp("phone") / "emulator.log")
    try:
        yield f"{HOST}:{tracker_port}"
    finally:
        assert _stop_group(proc) == 0


def test_rpc_tune_then_deploy_tuned_model(emulator: str, tmp_path) -> None:
    model = build_cnn(np.random.default_rng(11), (1, 4, 10, 10), [ConvSpec(8, connectivity=2.0)])
    database = tmp_path / "phone-db"
    results = tvm_patdnn.tune(model, TARGET, trials=2, database=database, rpc=f"{emulator}:{KEY}", progress=None)
    assert [r.kind for r in results] == ["pattern"]
    assert results[0].default_ms is not None and results[0].best_ms is not None
    target = resolve_target(TARGET)
    assert len(load_records(database, target).get_all_tuning_records()) >= 2
    assert target_key(target).startswith("llvm-aarch64")

    library = tmp_path / "tuned.so"
    tvm_patdnn.compile(model, TARGET, tuning_db=database).export_library(library)
    result = tvm_patdnn.deploy(model, TARGET, tracker=emulator, key=KEY, library=library, number=1, repeat=1)
    assert result.ok, result.errors
