"""The pattern-conv design space for meta_schedule: the CPU rule's own nest, tunable.

meta_schedule's default space never tiles a block with two indirect loads (the channel gather
and the run offsets), so evolutionary search has nothing to evolve. The space is
``PatternConvCPU().apply(func, target, tunable=True)``: the same loop nest as the untuned
default (``schedule_rules.pattern_conv_cpu``), with its knobs sampled instead of fixed — the
register tile (divisors of the padded output rows and vectors), the filter split (blocks,
serial, interleaved over threads), the LLVM unroll depth, and for fused layouts the pad's compute
location (``sample_compute_location``, mutated by ``MutateComputeLocation``) — so the default is one point of it
(its knobs as decisions) and ``tune`` measures it first as a seed.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..schedule_rules.pattern_conv_cpu import PatternConvCPU

__all__ = ["pattern_conv_space", "pattern_conv_space_generator"]


def pattern_conv_space(sch: s_tir.Schedule, target: Target) -> list[s_tir.Schedule]:
    """ScheduleFn body: the rule's tunable schedule, its instructions replayed on ``sch`` without
    their decisions, so the tune context's random state samples them (as meta_schedule's search
    does with every design space)."""
    rule = PatternConvCPU().apply(sch.mod["main"], target, tunable=True)
    if rule is None:
        raise ValueError(f"the pattern-conv CPU rule does not apply to this function for target {target}")
    s_tir.schedule.Trace(rule.trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
    return [sch]


def pattern_conv_space_generator(target: Target) -> ms.space_generator.ScheduleFn:
    """The space with the postprocessor and mutators its sampling instructions need."""
    return ms.space_generator.ScheduleFn(
        lambda sch: pattern_conv_space(sch, target),
        sch_rules=[],
        postprocs=[ms.postproc.RewriteParallelVectorizeUnroll()],
        mutator_probs={ms.mutator.MutateTileSize(): 0.85, ms.mutator.MutateUnroll(): 0.1,
                       ms.mutator.MutateComputeLocation(): 0.05},
    )
