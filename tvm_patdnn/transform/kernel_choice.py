"""Which dense kernel and register tile runs each dense conv: the rules' default, or a measured choice.

The dense passes (:class:`~tvm_patdnn.transform.WinogradConvRewrite`,
:class:`~tvm_patdnn.transform.DenseConvRewrite`) pick a kernel per layer by rules measured on a
few machines. ``patdnn tune`` measures, per layer of the model, the rules' choice and its
neighbours (:meth:`WinogradConvRewriter.candidates`: GEMM tiles and loop orders, direct-kernel
tiles and loop orders, Winograd tiles) and records them; ``compile`` then runs each layer on the
fastest it measured. The default is always one of the candidates, so tuning can only win.

A choice is a kernel spec (what the kernel builder takes), stored as the kernel's name and the
spec fields that are not the layer's shape; a layer is its shape and epilogue
(:func:`layer_key`), so one record serves every model with that layer. A GEMM record written
before its loop order was recorded (no ``filters_outer``) means the rule's order for its tile.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from tvm import tirx

from ..ops.dense_conv import DenseConvSpec, dense_conv_primfunc, pack_dense_conv_weight
from ..ops.direct_conv import DirectConvSpec, direct_conv_primfunc, pack_direct_conv_bias
from ..ops.winograd_conv import WinogradConvSpec, pack_winograd_weight, winograd_conv_primfunc

__all__ = ["KernelChoice", "KernelChoices", "KernelSpec", "kernel_function", "layer_key", "layer_spec",
           "pack_for_kernel"]

KernelSpec = DenseConvSpec | DirectConvSpec | WinogradConvSpec

# Per kernel: the spec's class, its name in records and the fields a choice records.
_KERNELS = {
    "gemm": (DenseConvSpec, ("filter_tile", "vectors", "lanes", "pack_panel", "filters_outer")),
    "direct": (DirectConvSpec, ("pixel_tile", "vectors", "lanes", "filters_inner", "weight_panel", "weight_prefetch",
                                 "weight_stream")),
    "winograd": (WinogradConvSpec, ("tile", "vectors", "lanes")),
}


def layer_key(layer: DenseConvSpec) -> str:
    """The layer's identity in records: its shape and epilogue as canonical JSON."""
    return json.dumps({name: _plain(value) for name, value in layer.layer_fields().items()}, sort_keys=True)


def layer_spec(fields: Mapping) -> DenseConvSpec:
    """The layer of a record (:func:`layer_key`'s fields, decoded), with a one-lane GEMM tile (any layer fits it)."""
    shape = {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}
    return DenseConvSpec(**shape, filter_tile=1, vectors=1, lanes=1)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class KernelChoice:
    """A kernel (``"gemm"``, ``"direct"`` or ``"winograd"``) and its tile fields for one layer."""

    kernel: str
    params: tuple[tuple[str, object], ...]

    @classmethod
    def of(cls, spec: KernelSpec) -> KernelChoice:
        kernel = next(name for name, (kind, _) in _KERNELS.items() if isinstance(spec, kind))
        return cls(kernel, tuple((name, getattr(spec, name)) for name in _KERNELS[kernel][1]))

    @classmethod
    def from_json(cls, entry: Mapping, layer: DenseConvSpec) -> KernelChoice:
        """The choice ``entry`` records for ``layer`` (a GEMM record without its loop order: the rule's; a direct
        record without ``weight_prefetch`` or ``weight_stream``, written before they existed: none)."""
        kernel, params = entry["kernel"], dict(entry["params"])
        if kernel == "gemm" and "filters_outer" not in params:
            params["filters_outer"] = dataclasses.replace(layer, **params, filters_outer=False).default_filters_outer
        if kernel == "direct":
            params.setdefault("weight_prefetch", 0)
            params.setdefault("weight_stream", 0)
        if kernel not in _KERNELS or sorted(params) != sorted(_KERNELS[kernel][1]):
            raise ValueError(f"not a dense kernel choice: {entry!r}")
        return cls(kernel, tuple((name, params[name]) for name in _KERNELS[kernel][1]))

    def as_json(self) -> dict:
        return {"kernel": self.kernel, "params": dict(self.params)}

    def spec(self, layer: DenseConvSpec, registers: int) -> KernelSpec:
        """The kernel spec for ``layer`` (ValueError if this choice does not fit it)."""
        params = dict(self.params)
        if self.kernel == "gemm":
            return dataclasses.replace(layer, **params)
        if self.kernel == "direct":
            return DirectConvSpec(layer, **params)
        if layer.kernel != (3, 3) or layer.strides != (1, 1):
            raise ValueError("Winograd runs 3x3 stride-1 convs only")
        shape = {name: value for name, value in layer.layer_fields().items() if name not in ("kernel", "strides")}
        return WinogradConvSpec.for_target(registers, params["lanes"], params["tile"], params["vectors"], **shape)

    def __str__(self) -> str:
        return f"{self.kernel}(" + ", ".join(f"{name}={value}" for name, value in self.params) + ")"


class KernelChoices:
    """The measured choice per layer that ``compile`` applies, and the layers the passes met.

    ``chosen`` maps :func:`layer_key` to a :class:`KernelChoice`. While the dense passes run they
    report every layer they take (:meth:`saw`; the tuner reads ``seen`` to know what to measure)
    and every choice they apply (``applied``, for the compile report)."""

    def __init__(self, chosen: Mapping[str, KernelChoice] | None = None):
        self.chosen = dict(chosen or {})
        self.seen: dict[str, DenseConvSpec] = {}
        self.applied: set[str] = set()

    def saw(self, layer: DenseConvSpec) -> None:
        self.seen.setdefault(layer_key(layer), layer)

    def spec(self, layer: DenseConvSpec, registers: int) -> KernelSpec | None:
        """The recorded choice's kernel spec for ``layer``; None without one or if it no longer fits
        (a record from an older kernel: the rules decide)."""
        key = layer_key(layer)
        choice = self.chosen.get(key)
        if choice is None:
            return None
        try:
            spec = choice.spec(layer, registers)
        except (ValueError, TypeError):
            return None
        self.applied.add(key)
        return spec


def kernel_function(spec: KernelSpec) -> tuple[tirx.PrimFunc, str]:
    """The kernel's PrimFunc and its name in the module."""
    if isinstance(spec, WinogradConvSpec):
        return winograd_conv_primfunc(spec), "winograd_conv"
    if isinstance(spec, DirectConvSpec):
        return direct_conv_primfunc(spec), "direct_conv"
    return dense_conv_primfunc(spec), "dense_conv"


def pack_for_kernel(spec: KernelSpec) -> tuple[Callable[[np.ndarray], np.ndarray], tuple, Callable | None]:
    """(weight packing, its cache key, bias packing or None) of the kernel's layout."""
    if isinstance(spec, WinogradConvSpec):
        return (lambda w: pack_winograd_weight(w, spec.tile, spec.filter_tile)), ("winograd", spec.tile,
                                                                                   spec.filter_tile), None
    if isinstance(spec, DirectConvSpec):
        block = spec.filter_block
        return (lambda w: pack_dense_conv_weight(w, block)), ("direct", block), \
            (lambda b: pack_direct_conv_bias(b, block))
    return (lambda w: pack_dense_conv_weight(w, spec.filter_tile)), ("gemm", spec.filter_tile), None
