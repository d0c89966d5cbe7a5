"""Tuning tasks: the PrimFuncs ``compile`` would schedule, exactly as the pipeline has them then.

Tasks come from the same passes ``compile`` runs before its schedule stage (pattern rewrite,
legalization, fusion), so a record's workload is structurally the function the compiler later
looks up. Structurally equal functions (e.g. two identical dense convs) are one task whose weight
is the number of calls. Each task also keeps its integer constant arguments (the pattern conv's
packed channels, offsets and inverse order): measurements must run on those, not on random
indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.s_tir.meta_schedule.arg_info import ArgInfo

from ..analysis import PatternOptions
from ..ops.pattern_conv import is_pattern_conv
from ..pipeline import fusion_passes
from ..transform.kernel_choice import KernelChoices
from ..tvm_compat import normalize_workload

__all__ = ["Task", "extract_tasks", "normalize"]


def normalize(func: tirx.PrimFunc) -> tvm.IRModule:
    """The workload form of a PrimFunc: meta_schedule's (``main``, noalias) normalisation."""
    return normalize_workload(func)


@dataclass
class Task:
    """One distinct PrimFunc to tune."""

    name: str
    mod: tvm.IRModule
    weight: int
    kind: str  # "pattern" (tvm_patdnn.tuning.space) or "generic" (meta_schedule's space for the target)
    int_args: dict[int, np.ndarray] = field(default_factory=dict)  # parameter position -> constant

    @property
    def args_info(self) -> list:
        return [info.as_json() for info in ArgInfo.from_prim_func(self.mod["main"])]


def _constant_int_args(call: relax.Call) -> dict[int, np.ndarray]:
    args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
    found = {}
    for position, arg in enumerate(args):
        if isinstance(arg, tvm.ir.GenericConst) and np.dtype(str(arg.ty.dtype)).kind in "iu":
            found[position] = arg.value.numpy()
    return found


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target, patterns: PatternOptions,
                  kernel_choices: KernelChoices | None = None) -> list[Task]:
    """The distinct PrimFuncs of ``mod`` that run as kernels after the compiler's fusion passes
    (``kernel_choices``, if given, collects the dense layers those passes met: ``seen``)."""
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target, patterns, kernel_choices=kernel_choices))(mod)
    calls: dict[str, list[relax.Call]] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            calls.setdefault(expr.args[0].name_hint, []).append(expr)

    for func in fused.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)

    tasks: list[Task] = []
    for gvar, func in sorted(fused.functions_items(), key=lambda item: item[0].name_hint):
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        if relax.analysis.has_reshape_pattern(func):
            continue  # becomes a view (RewriteDataflowReshape): no kernel runs
        uses = calls.get(gvar.name_hint, [])
        workload = normalize(func)
        same = next((t for t in tasks if tvm_ffi.structural_equal(t.mod, workload)), None)
        if same is not None:
            same.weight += max(1, len(uses))
            continue
        tasks.append(
            Task(
                name=gvar.name_hint,
                mod=workload,
                weight=max(1, len(uses)),
                kind="pattern" if is_pattern_conv(func) else "generic",
                int_args=_constant_int_args(uses[0]) if uses else {},
            )
        )
    return tasks
