"""The activations our dense, direct, Winograd, depthwise and fully connected kernels apply to
their accumulators before the one store (ReLU, or clip: ReLU6 and the like), so a fused chain
needs no second pass over its output; one definition for the five epilogues."""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

__all__ = ["ACTIVATIONS", "activate", "bias_relu", "check_activation"]

ACTIVATIONS = ("none", "relu", "clip")


def check_activation(activation: str) -> None:
    """Raise ValueError unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")


def activate(value: tirx.PrimExpr, spec) -> tirx.PrimExpr:
    """``value`` through ``spec.activation`` ("clip" between ``spec.clip_min`` and ``spec.clip_max``)."""
    if spec.activation == "relu":
        return T.max(value, tirx.const(0.0, "float32"))
    if spec.activation == "clip":
        return T.min(T.max(value, tirx.const(spec.clip_min, "float32")), tirx.const(spec.clip_max, "float32"))
    return value


def bias_relu(value: tirx.PrimExpr, bias: tirx.PrimExpr | None, relu: bool, lanes: int = 1) -> tirx.PrimExpr:
    """``value`` (``lanes`` wide) plus the scalar ``bias`` (None: none), through ReLU if ``relu``: the
    epilogue of the hand-written pattern-conv kernels (2x2, 4x4, channel-blocked)."""
    def wide(scalar):
        return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)

    if bias is not None:
        value = value + wide(bias)
    return T.max(value, wide(tirx.const(0.0, "float32"))) if relu else value
