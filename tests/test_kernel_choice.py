"""Dense kernels as points of the tuning space: ``tune`` measures every candidate kernel of each
dense layer (the rules' default among them), ``compile`` runs each layer on the fastest recorded,
and every candidate computes the same result."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn, reference_outputs

import tvm_patdnn
from tvm_patdnn.cli import main
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.ops import dense_conv
from tvm_patdnn.ops.dense_conv import DenseConvSpec
from tvm_patdnn.ops.winograd_conv import ERROR_BOUND
from tvm_patdnn.targets import resolve_target, vector_lanes, vector_registers
from tvm_patdnn.transform.kernel_choice import KernelChoice, kernel_function, layer_key, layer_spec
from tvm_patdnn.transform.winograd_conv_rewrite import WinogradConvRewriter
from tvm_patdnn.tuning.database import KERNEL_CHOICES, target_key
from tvm_patdnn.tuning.kernel_records import load_kernel_choices

TARGET = resolve_target("x86")
KERNEL_NAMES = ("dense_conv", "direct_conv", "winograd_conv")


def model() -> tuple:
    """Batch 2, odd sizes: a 1x1 with a residual add, a 3x3 stride 1 (Winograd candidates), a 3x3
    stride 2 with enough filters for the GEMM."""
    convs = [ConvSpec(24, kind="1x1", pads=(0, 0, 0, 0), residual=True), ConvSpec(20, kind="dense"),
             ConvSpec(4 * vector_lanes(TARGET), kind="dense", stride=2)]
    onnx_model = build_cnn(np.random.default_rng(4), (2, 24, 13, 13), convs)
    x = np.random.default_rng(5).standard_normal((2, 24, 13, 13)).astype(np.float32)
    return onnx_model, x


def write_records(database: Path, entries: list[dict], torn: str = "") -> None:
    database.mkdir(exist_ok=True)
    text = "".join(json.dumps(e) + "\n" for e in entries)
    (database / KERNEL_CHOICES).write_text(text + torn)


def record(layer, spec, ms: float | None, target=TARGET) -> dict:
    return {"target": target_key(target), "layer": json.loads(layer_key(layer)),
            "choice": KernelChoice.of(spec).as_json(), "ms": ms}


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list:
    """The dense layers compile meets in ``model()`` (an empty record file: the rules decide every
    one); compiled once for the module, each test writes its own records."""
    database = tmp_path_factory.mktemp("layers")
    write_records(database, [])
    compiled = tvm_patdnn.compile(model()[0], TARGET, tuning_db=database)
    return list(compiled.schedules.kernel_choices.seen.values())


def kernel_calls(compiled) -> list[str]:
    """The dense kernels the model calls, by kernel (the module numbers a second one: direct_conv1)."""
    return [line.split()[1].rstrip("0123456789") for line in compiled.executable.as_text().splitlines()
            if line.strip().startswith(tuple(f"call  {k}" for k in KERNEL_NAMES))]


def test_every_candidate_computes_the_reference(layers, tmp_path):
    onnx_model, x = model()
    expected = reference_outputs(onnx_model, {"input": x})[0]
    assert len(layers) == 3
    rewriter = WinogradConvRewriter(vector_registers(TARGET), vector_lanes(TARGET))
    candidates = [rewriter.candidates(layer) for layer in layers]
    kinds = {KernelChoice.of(spec).kernel for specs in candidates for spec in specs}
    assert kinds == {"gemm", "direct", "winograd"}
    for index in range(max(map(len, candidates))):  # candidate i of every layer in one model
        chosen = [(layer, specs[index]) for layer, specs in zip(layers, candidates) if index < len(specs)]
        write_records(tmp_path / "db", [record(layer, spec, 1.0) for layer, spec in chosen])
        compiled = tvm_patdnn.compile(onnx_model, TARGET, tuning_db=tmp_path / "db")
        assert len(compiled.schedules.kernel_choices.applied) == len(chosen)
        names = kernel_calls(compiled)
        for _layer, spec in chosen:
            assert kernel_function(spec)[1] in names, (index, spec)
        actual = compiled.run({"input": x})[0]
        error = np.abs(actual - expected).max() / np.abs(expected).max()
        assert error < 2 * ERROR_BOUND[4], (index, [str(KernelChoice.of(s)) for _, s in chosen], error)


def test_the_default_comes_first_and_a_record_overrides_the_rule(layers, tmp_path):
    onnx_model, x = model()
    rewriter = WinogradConvRewriter(vector_registers(TARGET), vector_lanes(TARGET))
    default = tvm_patdnn.compile(onnx_model, TARGET, tuning_db=False)
    assert sorted(kernel_calls(default)) == sorted(kernel_function(rewriter.candidates(layer)[0])[1]
                                                   for layer in layers)
    # the 3x3 stride-1 layer: the slowest record loses, the fastest wins, wherever it stands
    layer = next(layer for layer in layers if layer.kernel == (3, 3) and layer.strides == (1, 1))
    specs = rewriter.candidates(layer)
    fastest = next(s for s in specs if KernelChoice.of(s).kernel == "direct")
    write_records(tmp_path / "db", [record(layer, s, 2.0 if s != fastest else 1.0) for s in specs]
                  + [record(layer, specs[0], 0.1, resolve_target('{"kind":"llvm","mcpu":"skylake-avx512"}'))],
                  torn='{"target": "llvm-znver3", "layer"')  # another CPU's record and a killed writer's line
    compiled = tvm_patdnn.compile(onnx_model, TARGET, tuning_db=tmp_path / "db")
    assert compiled.schedules.kernel_choices.chosen[layer_key(layer)] == KernelChoice.of(fastest)
    assert "dense kernels: 1/3 layer(s) on their measured choice" in str(compiled.schedules)
    expected = reference_outputs(onnx_model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_tune_measures_each_candidate_once_and_compile_uses_the_best(tmp_path):
    onnx_model, x = model()
    database = tmp_path / "db"
    results = tvm_patdnn.tune(onnx_model, TARGET, trials=0, database=database, progress=None)
    dense = [r for r in results if r.kind == "dense"]
    rewriter = WinogradConvRewriter(vector_registers(TARGET), vector_lanes(TARGET))
    layers = layers_of_records(database)
    assert len(dense) == len(layers) == 3 and results.failed == 0
    assert [r.trials for r in dense] == [len(rewriter.candidates(layer)) for layer in layers]
    for r in dense:
        assert r.best_ms <= r.default_ms
    entries = [json.loads(line) for line in (database / KERNEL_CHOICES).read_text().splitlines()]
    measured = [entry for entry in entries if "verdict" not in entry]
    assert len(measured) == sum(r.trials for r in dense)
    # a verdict line for each layer whose fastest candidate was not the default (re-measured against
    # it): how many depends on the measurements
    assert len(entries) - len(measured) <= len(dense)

    again = tvm_patdnn.tune(onnx_model, TARGET, trials=0, database=database, progress=None)
    lines = (database / KERNEL_CHOICES).read_text().count("\n")
    assert lines == len(entries)  # everything on record and verified: nothing measured
    assert [(r.name, r.best_ms) for r in again if r.kind == "dense"] == [(r.name, r.best_ms) for r in dense]

    compiled = tvm_patdnn.compile(onnx_model, TARGET, tuning_db=database)
    assert len(compiled.schedules.kernel_choices.applied) == 3
    expected = reference_outputs(onnx_model, {"input": x})[0]
    error = np.abs(compiled.run({"input": x})[0] - expected).max() / np.abs(expected).max()
    assert error < 2 * ERROR_BOUND[4]


def layers_of_records(database: Path) -> list:
    """The layers of the record file, in the order tune measured them."""
    seen = {}
    for line in (database / KERNEL_CHOICES).read_text().splitlines():
        layer = json.loads(line)["layer"]
        seen.setdefault(json.dumps(layer, sort_keys=True), layer)
    return [layer_spec(layer) for layer in seen.values()]


def gemm_orders(candidates: list) -> dict[tuple, set[bool]]:
    """The loop orders among the candidates per GEMM tile with packed panels."""
    orders: dict[tuple, set[bool]] = {}
    for spec in candidates:
        if isinstance(spec, DenseConvSpec) and spec.pack_panel:
            orders.setdefault((spec.filter_tile, spec.vectors, spec.lanes), set()).add(spec.filters_outer)
    return orders


def test_tune_tries_both_gemm_loop_orders_where_the_weights_reach_l2():
    """1024->512 at 14x14 (2 MB of weights: filters outside by the rule on 8-lane tiles), 256->1024 (1 MB:
    pixels outside) and 64->256 at 56x56 (64 KB: one order); the rule's order comes first, and the
    16-lane (AVX-512) and 4-lane (NEON) tiles, outside the rule, are tried in both orders too."""
    def layer(in_c, out_c, size):
        return DenseConvSpec.for_target(16, 8, batch=1, in_channels=in_c, height=size, width=size, out_channels=out_c)

    avx2, avx512, neon = WinogradConvRewriter(16, 8), WinogradConvRewriter(32, 16), WinogradConvRewriter(32, 4)
    for spec, rule in [(layer(1024, 512, 14), True), (layer(256, 1024, 14), False)]:
        candidates = avx2.candidates(spec)
        assert candidates[0] == spec and spec.filters_outer == rule
        assert all(orders == {False, True} for orders in gemm_orders(candidates).values())
        for rewriter, lanes in [(avx512, 16), (neon, 4)]:
            tiles = gemm_orders(rewriter.candidates(spec))
            assert {True, False} in [orders for tile, orders in tiles.items() if tile[2] == lanes]
            assert not DenseConvSpec.for_target(rewriter.registers, lanes, **spec.layer_fields()).filters_outer
    small = avx2.candidates(layer(64, 256, 56))
    assert all(orders == {False} for orders in gemm_orders(small).values())


def test_a_record_with_the_other_gemm_loop_order_compiles_to_the_reference(layers, tmp_path):
    """The 1x1 and the 3x3 stride-2 layer on a GEMM tile in the order the rule does not give them."""
    onnx_model, x = model()
    rewriter = WinogradConvRewriter(vector_registers(TARGET), vector_lanes(TARGET))
    chosen = {}
    for layer in layers:
        gemm = [spec for spec in rewriter.candidates(layer) if isinstance(spec, DenseConvSpec) and spec.pack_panel]
        if gemm:
            chosen[layer_key(layer)] = (layer, dataclasses.replace(gemm[0], filters_outer=not gemm[0].filters_outer))
    assert len(chosen) == 2
    write_records(tmp_path / "db", [record(layer, spec, 1.0) for layer, spec in chosen.values()])
    compiled = tvm_patdnn.compile(onnx_model, TARGET, tuning_db=tmp_path / "db")
    assert compiled.schedules.kernel_choices.applied == set(chosen)
    assert kernel_calls(compiled).count("dense_conv") == 2
    expected = reference_outputs(onnx_model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_gemm_record_written_before_the_loop_order_means_the_rules_order(layers, tmp_path, monkeypatch):
    """A record without ``filters_outer`` (session 8's format) applies, in the rule's order for its
    tile: filters outside on an 8-lane tile here (threshold patched to 0), the usual order without
    the panel copy."""
    monkeypatch.setattr(dense_conv, "FILTERS_OUTER_WEIGHT_BYTES", 0)
    onnx_model, x = model()
    layer = next(layer for layer in layers if layer.kernel == (1, 1))
    packed = DenseConvSpec.for_target(16, 8, **layer.layer_fields())
    in_place = dataclasses.replace(packed, pack_panel=False, filters_outer=False)
    expected = reference_outputs(onnx_model, {"input": x})[0]
    for spec, rule in [(packed, True), (in_place, False)]:
        old = record(layer, spec, 1.0)
        del old["choice"]["params"]["filters_outer"]
        write_records(tmp_path / "db", [old])
        assert spec.filters_outer == rule
        assert load_kernel_choices(tmp_path / "db", TARGET)[0].chosen == {layer_key(layer): KernelChoice.of(spec)}
        compiled = tvm_patdnn.compile(onnx_model, TARGET, tuning_db=tmp_path / "db")
        assert compiled.schedules.kernel_choices.applied == {layer_key(layer)}
        actual = compiled.run({"input": x})[0]
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_corrupt_record_file_is_named(tmp_path):
    onnx_model, _ = model()
    database = tmp_path / "db"
    write_records(database, [])
    (database / KERNEL_CHOICES).write_text('["not", "a", "record"]\n')
    with pytest.raises(PatDNNError, match=KERNEL_CHOICES):
        tvm_patdnn.compile(onnx_model, TARGET, tuning_db=database)


def test_cli_tune_lists_the_dense_layers(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    convs = [ConvSpec(16, kind="1x1", pads=(0, 0, 0, 0)), ConvSpec(8, kind="dilated")]  # dilated: a generic task

    onnx.save(build_cnn(np.random.default_rng(2), (1, 8, 9, 9), convs), path)
    assert main(["tune", str(path), "--db", str(tmp_path / "skipped"), "--trials", "0", "--no-dense-kernels"]) == 0
    assert not (tmp_path / "skipped" / KERNEL_CHOICES).exists()
    capsys.readouterr()
    assert main(["tune", str(path), "--db", str(tmp_path / "db"), "--trials", "0"]) == 0
    out = capsys.readouterr().out
    assert "conv 1x1 8->16 9x9" in out and " dense " in out
    assert (tmp_path / "db" / KERNEL_CHOICES).is_file()


def test_a_direct_record_written_before_weight_prefetch_means_none():
    """A direct-kernel record without ``weight_prefetch`` (before session 16) reads back without the prefetch;
    one with it keeps it."""
    layer = DenseConvSpec(batch=1, in_channels=64, height=7, width=7, out_channels=64, kernel=(3, 3),
                          padding=(1, 1, 1, 1))
    params = {"pixel_tile": 6, "vectors": 4, "lanes": 8, "filters_inner": False, "weight_panel": 32768}
    old = KernelChoice.from_json({"kernel": "direct", "params": params}, layer)
    assert old.spec(layer, 32).weight_prefetch == 0
    new = KernelChoice.from_json({"kernel": "direct", "params": {**params, "weight_prefetch": 2}}, layer)
    assert new.spec(layer, 32).weight_prefetch == 2 and KernelChoice.of(new.spec(layer, 32)) == new


def test_a_direct_record_written_before_weight_stream_means_none():
    """A direct-kernel record without ``weight_stream`` (before session 17) reads back without the stream; one with
    it keeps it."""
    layer = DenseConvSpec(batch=1, in_channels=512, height=7, width=7, out_channels=2048, kernel=(1, 1))
    params = {"pixel_tile": 6, "vectors": 4, "lanes": 16, "filters_inner": False, "weight_panel": 32768,
              "weight_prefetch": 0}
    old = KernelChoice.from_json({"kernel": "direct", "params": params}, layer)
    assert old.spec(layer, 32).weight_stream == 0
    new = KernelChoice.from_json({"kernel": "direct", "params": {**params, "weight_stream": 2}}, layer)
    assert new.spec(layer, 32).weight_stream == 2 and KernelChoice.of(new.spec(layer, 32)) == new
