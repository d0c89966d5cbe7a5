"""The blocked layout (NCHW16c) between 16-lane direct-kernel convs.

The direct kernel (:mod:`tvm_patdnn.ops.direct_conv`) keeps pixels in registers and 16 filters along a
vector. Writing its tile to NCHW means a 16 x 16 register transpose per filter vector and 6-float stores
per filter (and the residual read the same way); in NCHW16c, ``(N, C / 16, H, W, 16)``, a pixel's 16
channels are one 64-byte vector: the output and the residual are whole aligned vector stores and loads, and
the input's per-pixel broadcasts read 16 channels from one line. This is ORT's layout between its NCHWc
convs; here a tensor takes it only where nothing else sees it:

a tensor is blocked when its producer is a 16-lane direct-kernel call with a multiple of 16 filters and
every user is one too, reading it as its input (a multiple of 16 channels, no padding; a strided 1x1 may compact
it) or as its residual; and a conv writing a blocked output reads a blocked residual (an NCHW residual would need
the transpose; an NCHW output adds a blocked residual to its rows before transposing them), so the set is narrowed
until that holds. Everything else
(the model's outputs, tensors read by Winograd, GEMM, pattern, pooling or any other op) stays NCHW, so other
targets and models are untouched: on 8-lane (AVX2) and 4-lane (NEON) targets no call qualifies and the
function is returned as it was.

In ResNet-50 these are the 28x28, 14x14 and 7x7 stages' block outputs and downsample outputs (the chains of
residual adds; the last block adds a blocked residual and writes NCHW for the global pool). The 28x28 stage's 1x1
128->512 + residual runs on the GEMM by the rules; :class:`~.dense_conv_rewrite.DenseConvRewriter` offers it on the
direct kernel as a *tentative* call, kept only if its output is blocked here (else the GEMM call replaces it and
the plan is made again). Zen 5, 1 thread, core 0, per-call minima in the dense ResNet-50, NCHW against blocked
interleaved in one process (7, 9, 11 rounds): 1x1 256->1024 + residual at 14x14 (x6) 1.08-1.14x (0.478-0.518 ->
0.434-0.462 ms; 75-80 -> 83-88% of 268 GFLOP/s, ORT 0.434-0.442 in its graph), 512->2048 + residual at 7x7 (x2)
1.018-1.046x, 2048->512 at 7x7 (x2) 1.028-1.037x, 1024->2048 s2 1.029-1.042x, 1024->256 at 14x14 (blocked input
only) 0.98-1.02x; whole model 1.031x, 1.006x (the 14x14 stage alone), 1.003x, 1.011x per round. The 28x28 stage
(two runs of 9 and 11 rounds, the second with another job on the core): 128->512 + residual (x4) on the direct kernel
0.438-0.450 -> 0.414-0.436 ms (1.011-1.079x; 85 -> 89-91%, ORT 0.425), 256->512 s2 1.028-1.041x, 512->256 1.016-1.037x,
512->128 (x3) 1.01-1.05x; sums of minima 1.002x both runs, whole model 0.993x / 0.997x per round (noise: a few
0.02 ms gains in a 33 ms model). MobileNetV2's 7x7 stage (960->160 + residual, 160->960, 960->320, 320->1280)
1.00-1.06x, whole 1.003x. Measured and not kept: the 56x56 stage the same way (64->256 + residual and the downsample
64->256 on the direct kernel: 0.98-1.02x, and the stage's 256->64 1x1s reading blocked inputs 0.92-0.93x); a
prefetch of the next weight panel inside the reduction loop of the 7x7 1x1s (one line per 16 channels two pages
ahead up to eight lines per 16 channels: 0.41-0.86x alone, the tile's accumulators stored after every 16 channels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tvm
from tvm import relax

from ..ops.direct_conv import BLOCK, DirectConvSpec, blocked_shape

__all__ = ["BLOCKED_LAYOUT_LANES", "blocked_specs", "apply_blocked_layout"]

# Lanes of the direct-kernel tiles that pass tensors between them in NCHW16c (16: AVX-512 only).
BLOCKED_LAYOUT_LANES = (16,)

def _direct_calls(func: relax.Function, kernels: dict) -> dict:
    """variable -> (call, spec) of the bindings that call a direct kernel (``kernels``: GlobalVar -> spec)."""
    found = {}
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir"
                    and value.args[0] in kernels):
                found[binding.var] = (value, kernels[value.args[0]])
    return found


def _reads_blocked_input(spec: DirectConvSpec) -> bool:
    conv = spec.conv
    return conv.in_channels % BLOCK == 0 and not any(conv.padding)


def blocked_specs(func: relax.Function, kernels: dict, tentative=()) -> tuple[dict, set]:
    """The direct-kernel calls of ``func`` whose layouts change: call -> spec with its blocked fields set
    (``kernels``: GlobalVar -> :class:`DirectConvSpec` of the direct kernels in the module), and the calls of
    ``tentative`` (direct only if their output is blocked) whose output is not: they are taken as other ops' calls
    (their readers and arguments NCHW) and the plan is made again until none is left."""
    calls = _direct_calls(func, kernels)
    dropped: set = set()
    while True:
        blocked = _blocked_tensors(func, {var: value for var, value in calls.items() if var not in dropped})
        left = {var for var, (call, _spec) in calls.items()
                if call in tentative and var not in blocked and var not in dropped}
        if not left:
            break
        dropped |= left
    found = {}
    for var, (call, spec) in calls.items():
        if var in dropped:
            continue
        data = call.args[1].fields[0]
        residual = call.args[1].fields[-1] if spec.conv.residual else None
        new = dataclasses.replace(spec, blocked_input=data in blocked, blocked_output=var in blocked,
                                  blocked_residual=residual is not None and residual in blocked)
        if new != spec:
            found[call] = new
    return found, {calls[var][0] for var in dropped}


def _blocked_tensors(func: relax.Function, calls: dict) -> set:
    """The variables bound to ``calls`` (direct-kernel calls: var -> (call, spec)) that take the blocked layout."""
    uses: dict = {}

    def use(var, consumer, role) -> None:
        uses.setdefault(var, []).append((consumer, role))

    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            if binding.var in calls:
                call, spec = calls[binding.var]
                args = list(call.args[1].fields)
                for i, arg in enumerate(args):
                    role = "input" if i == 0 else "residual" if spec.conv.residual and i == len(args) - 1 else "other"
                    if isinstance(arg, relax.Var):
                        use(arg, binding.var, role)
            else:
                relax.analysis.post_order_visit(
                    binding.value, lambda e: use(e, None, "other") if isinstance(e, relax.Var) else None)
    relax.analysis.post_order_visit(func.body.body,
                                    lambda e: use(e, None, "other") if isinstance(e, relax.Var) else None)

    def accepts(consumer, role) -> bool:
        if consumer is None or role == "other":
            return False
        spec = calls[consumer][1]
        return spec.lanes == BLOCK and (role == "residual" or _reads_blocked_input(spec))

    blocked = {var for var, (_call, spec) in calls.items()
               if spec.lanes in BLOCKED_LAYOUT_LANES and spec.lanes == BLOCK and spec.conv.out_channels % BLOCK == 0
               and uses.get(var) and all(accepts(consumer, role) for consumer, role in uses[var])}
    changed = True
    while changed:  # a blocked output needs a blocked residual (an NCHW output may read a blocked one)
        changed = False
        for var in list(blocked):
            call, spec = calls[var]
            residual = call.args[1].fields[-1] if spec.conv.residual else None
            if residual is not None and residual not in blocked:
                blocked.discard(var)
                changed = True
    return blocked


@relax.expr_functor.mutator
class _Relayout(relax.PyExprMutator):
    """Replace the planned calls by calls of their blocked kernels (the variables they bind get the new types)."""

    def __init__(self, mod, calls: dict, fallbacks: dict):
        super().__init__(mod)
        self.calls, self.fallbacks = calls, fallbacks

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if call in self.calls:
            gvar, ty = self.calls[call]
            return relax.call_tir(gvar, [self.visit_expr(a) for a in call.args[1].fields], ty)
        if call in self.fallbacks:  # the same data and residual, the other kernel's weight and bias
            other = self.fallbacks[call]
            args = list(other.args[1].fields)
            args[0] = self.visit_expr(call.args[1].fields[0])
            args[-1] = self.visit_expr(call.args[1].fields[-1])  # tentative calls add a residual
            return relax.call_tir(other.args[0], args, other.ty_args[0])
        return super().visit_call_(call)


def apply_blocked_layout(builder: relax.BlockBuilder, gvar: relax.GlobalVar, kernels: dict,
                         add: Callable[[DirectConvSpec], relax.GlobalVar], tentative: dict | None = None) -> None:
    """Switch the tensors :func:`blocked_specs` finds in function ``gvar`` of ``builder``'s module to NCHW16c:
    each affected call runs the kernel ``add(spec)`` returns for its new spec. ``tentative`` maps direct calls that
    run only if their output is blocked to the call replacing them otherwise (same data and residual)."""
    tentative = tentative or {}
    mod = builder.get()
    func = mod[gvar]
    plan, dropped = blocked_specs(func, kernels, tentative)
    if not plan and not dropped:
        return
    calls = {}
    for call, spec in plan.items():
        conv = spec.conv
        out = (blocked_shape if spec.blocked_output else (lambda *s: s))(
            conv.batch, conv.out_channels, conv.out_height, conv.out_width)
        calls[call] = (add(spec), relax.TensorType(out, "float32"))
    new = _Relayout(builder.get(), calls, {call: tentative[call] for call in dropped}).visit_expr(func)
    builder.update_func(gvar, new)
