"""Tensor-expression operators of tvm_patdnn."""

from .pattern_conv import PatternConvSpec, pattern_conv2d, pattern_conv2d_primfunc

__all__ = ["PatternConvSpec", "pattern_conv2d", "pattern_conv2d_primfunc"]
