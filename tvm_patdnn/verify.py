"""Is a compiled model right? Its outputs against ``onnx.reference`` on the same inputs.

``onnx.reference`` is the ground truth because it is ONNX's own executable specification,
independent of TVM: a library that loads and runs (on a phone, on PoCL) can still compute
garbage. Errors are relative to the largest reference value of an output, so one tolerance fits
logits and feature maps alike, and a near-zero expected element does not blow the error up.
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["DEFAULT_RTOL", "onnx_reference", "relative_error"]

DEFAULT_RTOL = 1e-4  # fp32 kernels that reorder sums stay well below it; a wrong kernel is far above


def onnx_reference(proto: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs, in graph order, computed by ``onnx.reference.ReferenceEvaluator``."""
    from onnx.reference import ReferenceEvaluator

    return [np.asarray(o) for o in ReferenceEvaluator(proto).run(None, inputs)]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (inf when the shapes differ)."""
    if actual.shape != expected.shape:
        return float("inf")
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    return float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0)) / scale
