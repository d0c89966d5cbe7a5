"""Tuning contexts build on every CPU family, whatever CPU runs the tests.

meta_schedule makes its default rules from the target's CPU features and looks up tensor
intrinsics by name while it does (int8 VNNI dot products on AVX-512 VNNI / AMX / Zen 4 CPUs,
AVX-512BW ones on Skylake-X, NEON/SDOT on ARM): a tuner that registers the wrong set crashes on
some hosts only. Building the contexts and design spaces (nothing is measured) for each family's
target JSON catches that on any machine.
"""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import ConvSpec, build_cnn
from tvm import te

from tvm_patdnn import PatDNNError
from tvm_patdnn.analysis import PatternOptions
from tvm_patdnn.frontend import load_model
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.tuning.tasks import Task, extract_tasks, normalize
from tvm_patdnn.tuning.tuner import tuning_contexts

CPU_FAMILIES = {
    "AVX2 Zen 3": '{"kind":"llvm","mcpu":"znver3"}',
    "AVX2 Haswell": '{"kind":"llvm","mcpu":"haswell"}',
    "AVX-512 Skylake-X": '{"kind":"llvm","mcpu":"skylake-avx512"}',
    "AVX-512 VNNI Cascade Lake": '{"kind":"llvm","mcpu":"cascadelake"}',
    "AVX-512 VNNI Ice Lake": '{"kind":"llvm","mcpu":"icelake-server"}',
    "AMX Sapphire Rapids": '{"kind":"llvm","mcpu":"sapphirerapids"}',
    "AVX-512 VNNI Rocket Lake": '{"kind":"llvm","mcpu":"rocketlake"}',
    "AVX-512 Zen 4": '{"kind":"llvm","mcpu":"znver4"}',
    "this host": "x86",
    "ARMv8 NEON": "arm_cpu-linux",
    "ARMv8.2 dot product": "arm_cpu",
    "Cortex-A76 (Galaxy S10)": "galaxy-s10",
    "ARMv8.6 i8mm": '{"kind":"llvm","mtriple":"aarch64-linux-gnu","mattr":["+neon","+v8.6a","+i8mm"]}',
    "ARMv8.6 dot product and i8mm":
        '{"kind":"llvm","mtriple":"aarch64-linux-android","mattr":["+neon","+v8.6a","+dotprod","+i8mm"]}',
}


@pytest.fixture(scope="module")
def imported_model():
    """A dense conv, a pattern conv and a strided pattern conv: a generic task and pattern tasks (the
    dense conv is dilated, so it stays on TVM's conv2d rather than on our untunable kernels)."""
    convs = [ConvSpec(8, kind="dilated"), ConvSpec(16, connectivity=2.0), ConvSpec(8, stride=2)]
    return load_model(build_cnn(np.random.default_rng(7), (1, 4, 12, 12), convs))


@pytest.mark.parametrize("family", list(CPU_FAMILIES))
def test_every_cpu_family_gets_a_design_space_for_every_kernel(imported_model, family):
    target = resolve_target(CPU_FAMILIES[family])
    tasks = extract_tasks(imported_model.mod, target, PatternOptions())
    assert {t.kind for t in tasks} == {"generic", "pattern"}
    contexts = tuning_contexts(tasks, target, cores=2)
    assert len(contexts) == len(tasks)
    assert all(len(space) >= 1 for _ctx, space in contexts)


def test_a_meta_schedule_failure_is_one_error_naming_the_kernel_and_target():
    data = te.placeholder((16,), name="data")
    add_one = te.create_prim_func([data, te.compute((16,), lambda i: data[i] + 1.0, name="out")])
    not_a_pattern_conv = Task("add_one", normalize(add_one), 1, "pattern")  # our space cannot schedule it
    with pytest.raises(PatDNNError, match=r"cannot tune kernel add_one for target llvm-znver3: ") as caught:
        tuning_contexts([not_a_pattern_conv], resolve_target('{"kind":"llvm","mcpu":"znver3"}'), cores=2)
    assert "\n" not in str(caught.value)
