"""The activations our dense, direct, Winograd, depthwise and fully connected kernels apply to
their accumulators before the one store (ReLU, or clip: ReLU6 and the like), so a fused chain
needs no second pass over its output; one definition for the five epilogues."""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

__all__ = ["ACTIVATIONS", "activate", "check_activation"]

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
