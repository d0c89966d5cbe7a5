"""Adreno (OpenCL) builds verified without a GPU: every kernel built and run on PoCL.

Needs Debian pocl-opencl-icd and PyPI pyopencl; the replay launches the kernels in the order
and with the grid/block sizes of TVM's host code and compares with onnx.reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.export import elf_machine

cl = pytest.importorskip("pyopencl", reason="Adreno kernel checks need pyopencl (pip install pyopencl)")
try:
    _POCL = any("Portable Computing Language" in p.name for p in cl.get_platforms())
except cl.Error:
    _POCL = False
if not _POCL:
    pytest.skip("Adreno kernel checks need PoCL (apt-get install pocl-opencl-icd)", allow_module_level=True)

from tvm_patdnn.cli import main  # noqa: E402
from tvm_patdnn.phone.opencl_check import check_opencl, split_kernel_sources  # noqa: E402

ADRENO_WAVE, ADRENO_MAX_GROUP = 64, 1024


def _model(seed: int, batch: int = 1, size: int = 12):
    convs = [
        ConvSpec(8),
        ConvSpec(8, residual=True, bias=False),
        ConvSpec(12, stride=2, pads=(1, 0, 1, 2)),
        ConvSpec(12, kind="dense"),
        ConvSpec(12, relu=False, connectivity=2.0),
    ]
    return build_cnn(np.random.default_rng(seed), (batch, 4, size, size), convs, head=True)


@pytest.fixture(scope="module")
def checked():
    return check_opencl(_model(0), "adreno")


def _assert_matches_with_adreno_launches(result) -> None:
    assert result.ok, result.summary()
    launched = {launch.kernel for launch in result.launches}
    assert launched <= set(result.kernels_built)
    pattern = [launch for launch in result.launches if launch.primfunc.startswith("pattern_conv2d")]
    assert len({launch.primfunc for launch in pattern}) == 4  # every pattern layer ran on "the GPU"
    for launch in result.launches:
        assert int(np.prod(launch.local_size)) <= ADRENO_MAX_GROUP
        assert all(g % b == 0 for g, b in zip(launch.global_size, launch.local_size))
    assert all(int(np.prod(launch.local_size)) % ADRENO_WAVE == 0 for launch in pattern)


def test_adreno_kernels_match_reference_on_pocl(checked) -> None:
    _assert_matches_with_adreno_launches(checked)


@pytest.mark.parametrize("seed, batch, size", [(1, 2, 9), (2, 1, 30)])
def test_adreno_other_shapes_match_reference_on_pocl(seed: int, batch: int, size: int) -> None:
    _assert_matches_with_adreno_launches(check_opencl(_model(seed, batch, size), "adreno"))


def _definition(name: str, source: str) -> str:
    """The parameter list of kernel ``name``'s definition (the last declaration in its chunk)."""
    start = source.rindex(f"void {name}(")
    return source[start:source.index("{", start)]


def test_pattern_kernels_use_buffers_and_vector_weight_loads(checked) -> None:
    assert not any("image2d" in source for source in checked.sources.values())  # plain buffer path
    accumulations = [source for name, source in checked.sources.items()
                     if name.startswith("pattern_conv2d") and "values_ptr" in _definition(name, source)]
    assert len(accumulations) == 4
    assert all("vload4(0, values_ptr" in source for source in accumulations)


def test_split_kernel_sources_keeps_one_definition_per_program() -> None:
    source = "// Function: a\n__kernel void a();\n__kernel void b();\n__kernel void a() {}\n\n" \
             "// Function: b\n__kernel void a();\n__kernel void b();\n__kernel void b() {}\n"
    chunks = split_kernel_sources(source)
    assert sorted(chunks) == ["a", "b"]
    assert "void a() {}" in chunks["a"] and "void b() {}" not in chunks["a"]


def test_adreno_library_is_aarch64_with_kernels_inside(tmp_path: Path) -> None:
    path = tvm_patdnn.compile(_model(4), "adreno").export_library(tmp_path / "adreno.so")
    assert elf_machine(path) == 183
    assert b"pattern_conv2d_conv0_kernel" in path.read_bytes()


def test_check_needs_an_opencl_target() -> None:
    with pytest.raises(PatDNNError, match="needs an OpenCL target"):
        check_opencl(_model(0), "arm_cpu")


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_model(5), path)
    assert main(["opencl-check", str(path), "--launches"]) == 0
    out = capsys.readouterr().out
    assert "pattern_conv2d_conv0_kernel_1: global (" in out and "outputs match the ONNX reference" in out
    assert main(["opencl-check", str(path), "--target", "arm_cpu"]) == 2


def test_a_wrong_kernel_is_reported_as_a_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The check has teeth: the same kernels with the padded input doubled (a mutation of the
    generated OpenCL C, as a codegen bug would be) must fail it, from Python and the CLI."""
    from tvm_patdnn.phone import opencl_check

    generated = opencl_check._opencl_sources

    def doubled_input(executable):
        sources = generated(executable)
        name = next(n for n, source in sources.items() if "condval = data_ptr[" in source)
        sources[name] = sources[name].replace("condval = data_ptr[", "condval = 2.0f * data_ptr[", 1)
        return sources

    monkeypatch.setattr(opencl_check, "_opencl_sources", doubled_input)
    result = check_opencl(_model(0), "adreno")
    assert not result.ok and max(result.errors) > 1e-2
    assert "outputs DIFFER from the ONNX reference" in result.summary()
    path = tmp_path / "model.onnx"
    onnx.save(_model(0), path)
    assert main(["opencl-check", str(path)]) == 1
    assert "DIFFER" in capsys.readouterr().out
