"""The tvm_patdnn compilation pipeline, as lists of passes by stage.

Same shape as TVM's ``relax/backend/cpu_generic/pipeline.py``, with two stages of our own:
the pattern stage (fold constants so weights and biases are literal, then rewrite pattern-
sparse convs, and on CPUs the remaining dense convs) before legalization, and the schedule stage (our rules for the pattern conv
and the dense fallbacks, then dlight's CPU rules) after fusion.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight

from .analysis import PatternOptions
from .report import ConvRecord
from .schedule_rules import DenseConv2dCPU, MatmulCPU, PatternConvCPU, PatternConvGPU
from .targets import accumulator_registers, fma_chains, gpu_threads, vector_lanes, vector_registers
from .transform import (DenseConvRewrite, DepthwiseConvRewrite, FullyConnectedRewrite, PatternConvRewrite,
                        SparsePointwiseRewrite, UnitReductionRewrite, WinogradConvRewrite)
from .transform.inverted_residual_rewrite import InvertedResidualRewrite
from .transform.kernel_choice import KernelChoices

__all__ = ["pattern_passes", "fusion_passes", "default_schedule_rules", "schedule_passes", "get_pipeline"]


def pattern_passes(
    target: tvm.target.Target,
    patterns: PatternOptions = PatternOptions(),
    on_conv: Callable[[ConvRecord], None] | None = None,
    dense_kernels: bool = True,
    kernel_choices: KernelChoices | None = None,
) -> list[tvm.transform.Pass]:
    """Detect pattern-sparse convs and rewrite them into the pattern-conv operator; rewrite
    block-sparse 1x1 convs into the sparse pointwise kernel (CPU or OpenCL), and on CPUs dense
    convs into our dense kernels (``dense_kernels=False`` leaves both to the legalized conv2d and
    its schedule rule: the old dense path, kept for benchmarks), each layer on the kernel
    ``kernel_choices`` (``patdnn tune``'s measurements) holds for it, else the rules'."""
    cpu_kernels = dense_kernels and target.kind.name == "llvm"
    sparse_kernels = dense_kernels and target.kind.name in ("llvm", "opencl")
    passes = [
        relax.transform.FoldConstant(),
        PatternConvRewrite(patterns, vector_lanes(target), accumulator_registers(target), on_conv,
                           sparse_pointwise=sparse_kernels, threads=int(target.attrs.get("num-cores") or 1)),
    ]
    if sparse_kernels:
        gpu = gpu_threads(target) if target.kind.name == "opencl" else None
        passes.append(SparsePointwiseRewrite(vector_registers(target), vector_lanes(target), chains=fma_chains(target),
                                             gpu=gpu))
    if cpu_kernels:
        passes.append(WinogradConvRewrite(vector_registers(target), vector_lanes(target), choices=kernel_choices))
        passes.append(InvertedResidualRewrite(vector_registers(target), vector_lanes(target),
                                              threads=int(target.attrs.get("num-cores") or 1)))
        passes.append(DenseConvRewrite(vector_registers(target), vector_lanes(target), choices=kernel_choices))
        passes.append(DepthwiseConvRewrite(vector_registers(target), vector_lanes(target)))
        passes.append(FullyConnectedRewrite(vector_registers(target), vector_lanes(target)))
    if "gpu" in target.keys:
        passes.append(UnitReductionRewrite())  # dlight's GPU Fallback mis-schedules them
    return passes


def default_schedule_rules(target: tvm.target.Target) -> list[dlight.ScheduleRule]:
    """The untuned rules, in order: pattern conv, dense conv/pool, fully connected, then dlight's.

    GPU targets (OpenCL/Adreno) get dlight's GPU rules, which is all the generic GPU
    legalization adds to the CPU one; the rest of the pipeline is the same for both.
    """
    if "gpu" in target.keys:
        return [PatternConvGPU(), dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]
    return [PatternConvCPU(), DenseConv2dCPU(), MatmulCPU(), dlight.cpu.GEMV(), dlight.cpu.Reduction()]


def schedule_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Default schedules for every PrimFunc not scheduled yet (by the tuning records)."""
    return [dlight.ApplyDefaultSchedule(*default_schedule_rules(target))]


def fusion_passes(
    target: tvm.target.Target,
    patterns: PatternOptions = PatternOptions(),
    on_conv: Callable[[ConvRecord], None] | None = None,
    dense_kernels: bool = True,
    kernel_choices: KernelChoices | None = None,
) -> list[tvm.transform.Pass]:
    """Everything before scheduling: its PrimFuncs are the tuning tasks (tvm_patdnn.tuning)."""
    return (
        pattern_passes(target, patterns, on_conv, dense_kernels, kernel_choices)
        + cpu_generic.library_dispatch_passes(target)
        + cpu_generic.legalize_passes(target)
    )


def get_pipeline(
    target: tvm.target.Target,
    patterns: PatternOptions = PatternOptions(),
    on_conv: Callable[[ConvRecord], None] | None = None,
    tuning_records: tvm.transform.Pass | None = None,
    dense_kernels: bool = True,
    kernel_choices: KernelChoices | None = None,
) -> tvm.transform.Pass:
    """The whole Relax pipeline for ``tvm.compile(mod, target, relax_pipeline=...)``.

    ``tuning_records`` (``tvm_patdnn.tuning.apply_tuning_records``) schedules the PrimFuncs it
    has records for; the default rules schedule the rest. ``kernel_choices``
    (``tvm_patdnn.tuning.load_kernel_choices``) picks the dense kernel of the layers it covers.
    """

    @tvm.transform.module_pass(opt_level=0, name="PatDNNPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                fusion_passes(target, patterns, on_conv, dense_kernels, kernel_choices)
                + ([tuning_records] if tuning_records is not None else [])
                + schedule_passes(target)
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
