"""The tuner verifies dense kernel choices: real tunes of one dense conv layer at 1 thread.

One tune measures every candidate and verifies the fastest (module fixture); the tests then write
``dense_kernels.json`` files from its measurements (a candidate recorded faster than it is, a slow
candidate as the rules' choice, a torn verdict line) and let ``tune`` verify them. No timing is
asserted beyond the verdicts, which compare kernels that measured far apart (the slowest candidate
against the rules' choice or the fastest).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from model_factory import ConvSpec, build_cnn, reference_outputs

import tvm_patdnn
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.transform.kernel_choice import KernelChoice, layer_spec
from tvm_patdnn.transform.winograd_conv_rewrite import WinogradConvRewriter
from tvm_patdnn.tuning.database import KERNEL_CHOICES
from tvm_patdnn.tuning.kernel_records import load_kernel_choices
from tvm_patdnn.tuning.threads import for_threads
from tvm_patdnn.tuning.tuner import KEEP_MARGIN

TARGET = for_threads(resolve_target("x86"), 1)
MODEL = build_cnn(np.random.default_rng(5), (1, 16, 16, 16), [ConvSpec(32, kind="dense")])


def tune(database: Path, progress: io.StringIO | None = None):
    (row,) = tvm_patdnn.tune(MODEL, "x86", trials=0, threads=1, database=database, progress=progress)
    return row


def lines(database: Path) -> list[dict]:
    return [json.loads(line) for line in (database / KERNEL_CHOICES).read_text().splitlines()]


def write(database: Path, entries: list[dict], torn: str = "") -> None:
    database.mkdir()
    (database / KERNEL_CHOICES).write_text("".join(json.dumps(e) + "\n" for e in entries) + torn)


def choice(entry: dict) -> KernelChoice:
    return KernelChoice.from_json(entry["choice"], layer_spec(entry["layer"]))


def failed(entry: dict) -> dict:
    """The measurement as a failed candidate: on record (not measured again), never verified."""
    return {**entry, "ms": None, "error": "RuntimeError: test"}


def compiled_choices(database: Path) -> set:
    compiled = tvm_patdnn.compile(MODEL, "x86", tuning_db=database, threads=1)
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 16)).astype(np.float32)
    expected = reference_outputs(MODEL, {"input": x})[0]
    np.testing.assert_allclose(compiled.run(input=x)[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    return {str(c) for key, c in compiled.schedules.kernel_choices.chosen.items()
            if key in compiled.schedules.kernel_choices.applied}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    """A tune of the layer: its measurements, the rules' choice first. Unless that measured
    fastest, the tune verified the fastest few against it and its result row says so."""
    database = tmp_path_factory.mktemp("measured") / "db"
    progress = io.StringIO()
    row = tune(database, progress)
    measurements = [e for e in lines(database) if "verdict" not in e]
    verdicts = [e["verdict"] for e in lines(database) if "verdict" in e]
    assert row.kind == "dense" and row.trials == len(measurements) and row.search_speedup >= 1
    if row.search_speedup == 1:  # the rules' choice measured fastest: nothing to verify
        assert verdicts == [] and row.kept is None
    else:
        (verdict,) = verdicts
        assert f"verified {row.name}: default" in progress.getvalue()
        assert row.kept == verdict["kept"] and row.candidate_speedup == verdict["speedup"]
        assert row.speedup == (row.candidate_speedup if row.kept else 1.0)
    return measurements


def test_a_choice_that_only_measured_faster_is_not_applied_and_a_killed_verification_resumes(measured, tmp_path):
    """The slowest candidate recorded 100x faster than the rules' choice, and a tune killed while it
    wrote the verdict (a torn last line): compile skips the torn line and runs the unverified choice,
    with a warning. The re-run measures nothing again, cuts the torn line, verifies, keeps the
    default, and compile runs the rules' choice. Another re-run verifies nothing again."""
    default, *others = measured
    slowest = max(others, key=lambda e: e["ms"])
    recorded = [default, {**slowest, "ms": default["ms"] / 100}, *(failed(e) for e in others if e is not slowest)]
    database = tmp_path / "db"
    write(database, recorded, torn='{"target": "llvm", "layer": {"activation": "re')
    with pytest.warns(UserWarning, match="1 dense layer.* measured once, not verified"):
        assert compiled_choices(database) == {str(choice(slowest))}

    progress = io.StringIO()
    row = tune(database, progress)
    assert "default kept" in progress.getvalue()
    assert row.kept is False and row.speedup == 1.0 and row.candidate_speedup < 1 < 50 < row.search_speedup
    after = lines(database)
    assert after[:-1] == recorded and after[-1]["verdict"]["kept"] is False  # the torn line cut
    assert set(load_kernel_choices(database, TARGET)[0].chosen.values()) == {choice(default)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled_choices(database) == {str(choice(default))}  # the rules' choice, no warning
    text = (database / KERNEL_CHOICES).read_text()
    tune(database)
    assert (database / KERNEL_CHOICES).read_text() == text


def test_a_choice_that_wins_is_applied(measured, tmp_path, monkeypatch):
    """The slowest candidate as the rules' choice (the rewriter's candidates reordered), the fastest
    measured: the verification keeps the fastest and compile runs it."""
    slowest = max(measured, key=lambda e: e["ms"])
    fastest = min(measured, key=lambda e: e["ms"])
    assert slowest["ms"] > 2 * KEEP_MARGIN * fastest["ms"]
    candidates = WinogradConvRewriter.candidates

    def slowest_first(self, layer):
        found = candidates(self, layer)
        return sorted(found, key=lambda spec: KernelChoice.of(spec) != choice(slowest))

    monkeypatch.setattr(WinogradConvRewriter, "candidates", slowest_first)
    database = tmp_path / "db"
    write(database, [slowest, fastest, *(failed(e) for e in measured if e not in (slowest, fastest))])
    row = tune(database)
    assert row.kept is True and row.speedup == row.candidate_speedup >= KEEP_MARGIN
    assert choice(lines(database)[-1]) == choice(fastest)
    assert compiled_choices(database) == {str(choice(fastest))}
