"""Relax pass: rewrite pattern-sparse conv2d (+ bias add, + ReLU) into the pattern-conv operator.

A dpl pattern finds conv2d with a constant weight, optionally followed by the add of a
constant per-channel bias and by ReLU; the rewriter analyses the weight, packs it in FKW
form at compile time and replaces the whole chain by one ``call_tir`` of a pattern-conv
PrimFunc. Everything it does not rewrite stays on TVM's dense path, and every conv2d is
reported (through ``on_conv``) with the reason for the decision.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from ..analysis import PatternOptions, analyze_conv_weight
from ..fkw import pack_fkw
from ..ops.pattern_conv import PatternConvSpec, pattern_conv2d_primfunc
from ..ops.pattern_conv_2x2 import LANES as TAP_LANES
from ..ops.pattern_conv_2x2 import arranged_rows, pattern_conv_2x2_primfunc, tap_lanes_apply
from ..ops.pattern_conv_phases import pattern_conv_phases_primfunc, phase_planes_apply
from ..ops.pattern_conv_shifted_rows import pattern_conv_shifted_rows_primfunc, shifted_rows_apply
from ..ops.pattern_conv_tap_windows import pattern_conv_tap_windows_primfunc, tap_windows_apply, tap_windows_weights
from ..ops.pattern_conv_blocked import blocked_applies, blocked_layout, blocked_weights, pattern_conv_blocked_primfunc
from ..ops.pattern_conv_wide import pattern_conv_wide_primfunc, wide_rows_apply
from ..report import ConvRecord
from .exprs import add_kernel, constant_array, per_channel_bias, single_use_values, static_shape
from .sparse_pointwise_rewrite import runs_sparse

__all__ = ["PatternConvRewrite", "conv_report"]

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


def _conv_name(weight: relax.Expr, index: int) -> str:
    """The ONNX node (or weight) name the importer left on the weight's span, else a counter."""
    span = getattr(weight, "span", None)
    if span is not None and span.source_name is not None and span.source_name.name:
        return str(span.source_name.name)
    return f"conv2d_{index}"


@tvm.transform.module_pass(opt_level=0, name="PatternConvRewrite")
class PatternConvRewrite:
    """Rewrite pattern-sparse conv2d chains into pattern-conv ``call_tir``s.

    Parameters
    ----------
    patterns:
        Which layers are pattern-sparse (:class:`~tvm_patdnn.analysis.PatternOptions`).
    vector_width, accumulators:
        fp32 lanes of the target's vectors and the output vectors a register tile may hold
        (:func:`tvm_patdnn.targets.accumulator_registers`): the operator's layout
        (:func:`~tvm_patdnn.ops.pattern_conv.target_layout`); on AVX-512 and AVX2 targets 2x2
        images take the (pixel x tap) kernel of :mod:`tvm_patdnn.ops.pattern_conv_2x2` and 4x4 images
        (8x8 on AVX-512) the shifted-rows one of :mod:`tvm_patdnn.ops.pattern_conv_shifted_rows`, on AVX2
        many-channel layers
        the channel-blocked one of :mod:`tvm_patdnn.ops.pattern_conv_blocked`.
    on_conv:
        Called with a :class:`ConvRecord` for every conv2d met, rewritten or not.
    sparse_pointwise:
        Whether :class:`~tvm_patdnn.transform.SparsePointwiseRewrite` runs after this pass (CPU and
        OpenCL targets): its 1x1 convs are then reported as kind "sparse".
    threads:
        The target's cores, which the hand-built kernels split their work for: each thread of the
        2x2 and 4x4 kernels takes a contiguous run of filters holding its share of the kernels, the
        channel-blocked kernel's threads take (image, tile, filter group) tasks.
    """

    def __init__(
        self,
        patterns: PatternOptions = PatternOptions(),
        vector_width: int = 8,
        accumulators: int = 8,
        on_conv: Callable[[ConvRecord], None] | None = None,
        sparse_pointwise: bool = False,
        threads: int = 1,
    ):
        self.sparse_pointwise = sparse_pointwise
        self.threads = threads
        self.patterns = patterns
        self.vector_width = vector_width
        self.accumulators = accumulators
        self.on_conv = on_conv or (lambda record: None)

        self.data = wildcard()
        self.weight = wildcard()
        self.bias = is_const()
        self.conv = is_op("relax.nn.conv2d")(self.data, self.weight)
        self.add = is_op("relax.add")(self.conv, self.bias) | is_op("relax.add")(self.bias, self.conv)
        self.relu = is_op("relax.nn.relu")(self.add | self.conv)
        self.pattern = self.relu | self.add | self.conv

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        self._builder = relax.BlockBuilder(mod)
        # rewrite_call offers a conv once per matching root (conv, add, relu) and again until
        # nothing changes: analyse each conv once, build each variant once, keep the record of
        # the largest fusion (the one left in the module), drop unused variants at the end.
        self._analyses: dict[relax.Expr, tuple] = {}
        self._variants: dict[tuple, relax.GlobalVar] = {}
        self._records: dict[relax.Expr, ConvRecord] = {}
        self._order: dict[relax.Expr, int] = {}
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or func.attrs and func.attrs.get("Primitive", 0):
                continue
            for block in getattr(func.body, "blocks", []):
                for binding in block.bindings:
                    if isinstance(binding.value, relax.Call) and binding.value.op.same_as(_CONV2D):
                        self._order[binding.value] = len(self._order)
            self._single_use = single_use_values(func)
            self._builder.update_func(gvar, rewrite_call(self.pattern, self._rewrite, func))
        for conv in sorted(self._records, key=lambda c: self._order.get(c, len(self._order))):
            self.on_conv(self._records[conv])
        return relax.transform.DeadCodeElimination()(self._builder.get())

    def _analyse(self, conv: relax.Call, weight: relax.Expr):
        """(record fields, analysis or None, dense reason or None) of one conv2d."""
        attrs = conv.attrs
        data = conv.args[0]
        data_shape, weight_shape, out_shape = static_shape(data), static_shape(weight), static_shape(conv)
        fields = dict(
            name=_conv_name(weight, self._order.get(conv, len(self._analyses))),
            data_shape=data_shape or (),
            weight_shape=weight_shape or (),
            output_shape=out_shape or (),
            stride=tuple(int(s) for s in attrs.strides),
            padding=tuple(int(p) for p in attrs.padding),
        )
        reason = None
        if data_shape is None or out_shape is None or weight_shape is None:
            reason = "shapes are not static"
        elif conv.ty.dtype != "float32" or data.ty.dtype != "float32":
            reason = f"dtype {conv.ty.dtype} is not float32"
        elif (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
            reason = f"layout {attrs.data_layout}/{attrs.kernel_layout} is not NCHW/OIHW"
        elif int(attrs.groups) != 1:
            reason = "grouped/depthwise convolution"
        elif any(int(d) != 1 for d in attrs.dilation):
            reason = "dilated convolution"
        elif not isinstance(weight, tvm.ir.GenericConst):
            reason = "weight is not a constant"
        analysis = None
        if reason is None:
            analysis = analyze_conv_weight(constant_array(weight), self.patterns.entries, self.patterns.max_patterns)
            reason = analysis.reason
        return fields, analysis, reason

    def _record(self, conv, fields, analysis, reason, fused=()) -> None:
        previous = self._records.get(conv)
        if previous is not None and len(previous.fused) > len(fused):
            return
        weight_shape, out_shape = fields["weight_shape"], fields["output_shape"]
        kh, kw = weight_shape[2:] if weight_shape else (0, 0)
        total = weight_shape[0] * weight_shape[1] if weight_shape else 0
        out_pixels = int(np.prod(out_shape)) // out_shape[1] if out_shape else 0
        nonzeros = analysis.nonzeros if analysis is not None else total * kh * kw
        sparse = self.sparse_pointwise and runs_sparse(conv)
        self._records[conv] = ConvRecord(
            kind="sparse" if sparse else "dense" if reason else "pattern",
            reason=None if sparse else reason,
            n_patterns=len(analysis.patterns) if analysis is not None else 0,
            kept_kernels=analysis.kept_kernels if analysis is not None else total,
            total_kernels=total,
            density=analysis.density if analysis is not None else 1.0,
            dense_flops=2 * out_pixels * total * kh * kw,
            nonzero_flops=2 * out_pixels * nonzeros,
            fused=fused,
            patterns=tuple(analysis.patterns) if analysis is not None else (),
            pattern_counts=tuple(
                int(c) for c in np.bincount(analysis.assignment[analysis.assignment >= 0], minlength=len(analysis.patterns))
            )
            if analysis is not None and analysis.assignment is not None
            else (),
            **fields,
        )

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        conv, weight = matches[self.conv], matches[self.weight]
        if conv not in self._analyses:
            self._analyses[conv] = self._analyse(conv, weight)
        fields, analysis, reason = self._analyses[conv]
        if reason is not None:
            self._record(conv, fields, analysis, reason)
            return expr

        inner = [matches[p] for p in (self.conv, self.add) if p in matches and not matches[p].same_as(expr)]
        if any(value not in self._single_use for value in inner):
            return expr  # fusing would compute a value other ops use twice: a smaller chain takes the conv

        out_channels = fields["weight_shape"][0]
        bias = trailing_add = None
        if self.bias in matches:
            bias = per_channel_bias(matches[self.bias], out_channels)
            if bias is None:
                trailing_add = matches[self.bias]
        relu = self.relu in matches and trailing_add is None
        fused = (("bias",) if bias is not None else ()) + (("relu",) if relu else ())
        key = (conv, fused, None if bias is None else bias.tobytes())
        if key not in self._variants:
            self._variants[key] = self._build(conv, weight, analysis, fields, bias, relu)
        gvar, args = self._variants[key]
        result = relax.call_tir(gvar, args, relax.TensorType(fields["output_shape"], "float32"))
        self._record(conv, fields, analysis, None, fused)
        if trailing_add is not None:
            # Not a per-channel bias: keep that add (and any ReLU) on the dense path.
            result = relax.op.add(result, trailing_add)
            if self.relu in matches:
                result = relax.op.nn.relu(result)
        return result

    def _build(self, conv, weight, analysis, fields, bias, relu):
        """Pack the weight in FKW form and add the pattern-conv PrimFunc to the module."""
        fkw = pack_fkw(constant_array(weight), analysis)
        spec = PatternConvSpec.from_fkw(
            fkw, fields["data_shape"], fields["stride"], fields["padding"], bias is not None, relu, self.vector_width,
            self.accumulators,
        )
        # 2x2 images on AVX-512 and AVX2: the scheduled (pixel x tap) kernel, 4x4 images (and 8x8 on AVX-512) the
        # shifted-rows one, 14x14 -> 7x7 at stride 2 on AVX-512 the tap-window one (its own filter order), AVX-512
        # layers of PHASE_PLANE_SIZES the phase-plane one, and many-channel layers
        # on AVX2 the channel-blocked one, which take FKW's filter order;
        # otherwise the compute the rules schedule, or on AVX-512 for rows of whole vectors and at most 128
        # channels the wide-rows kernel, which take its inverse.
        tap_lanes = tap_lanes_apply(spec, self.vector_width)
        tap_windows = tap_windows_apply(spec, self.vector_width)
        shifted_rows = not tap_windows and shifted_rows_apply(spec, self.vector_width)
        phases = not shifted_rows and not tap_windows and phase_planes_apply(spec, self.vector_width)
        blocked = not tap_lanes and blocked_applies(spec)
        weights, stored_order = [fkw.values, fkw.channels, fkw.offsets], fkw.order
        if tap_lanes:
            func = pattern_conv_2x2_primfunc(spec, self.vector_width, self.threads)
            if self.vector_width < TAP_LANES:  # AVX2: each kernel's channel * patterns + pattern
                weights[1] = arranged_rows(fkw.channels, fkw.offsets, len(spec.patterns))
        elif tap_windows:  # AVX-512 7x7 outputs of TAP_WINDOW_SIZES: per-channel tap windows in channel blocks
            func = pattern_conv_tap_windows_primfunc(spec, self.threads, self.vector_width)
            *weights, stored_order = tap_windows_weights(fkw, spec, self.threads)
        elif shifted_rows:
            func = pattern_conv_shifted_rows_primfunc(spec, self.threads, self.vector_width)
        elif phases:  # AVX-512 sizes of PHASE_PLANE_SIZES (stride 2, 14x14, 28x28, 56x56): phase planes
            func = pattern_conv_phases_primfunc(spec, self.threads, self.vector_width)
        elif blocked:  # many input channels on AVX2: the channel-blocked kernel
            layout = blocked_layout(spec)
            func, weights = pattern_conv_blocked_primfunc(layout, self.threads), blocked_weights(fkw, layout)
        elif wide_rows_apply(spec):
            func = pattern_conv_wide_primfunc(spec)
        else:
            func = pattern_conv2d_primfunc(spec)
        name = "pattern_conv2d_" + "".join(ch if ch.isalnum() else "_" for ch in fields["name"])
        gvar = add_kernel(self._builder, func, name)
        args = [
            conv.args[0],
            *(relax.const(w) for w in weights),
            relax.const(stored_order if tap_lanes or shifted_rows or tap_windows or phases or blocked
                        else np.argsort(fkw.order).astype(np.int32)),
        ] + ([relax.const(bias)] if bias is not None else [])
        return gvar, args


def conv_report(mod: IRModule, patterns: PatternOptions = PatternOptions()) -> list[ConvRecord]:
    """What :class:`PatternConvRewrite` would do with every conv2d of ``mod``."""
    records: list[ConvRecord] = []
    PatternConvRewrite(patterns, on_conv=records.append)(mod)
    return records
