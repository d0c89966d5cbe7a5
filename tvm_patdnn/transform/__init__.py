"""Relax passes of tvm_patdnn."""

from .pattern_conv_rewrite import PatternConvRewrite, conv_report

__all__ = ["PatternConvRewrite", "conv_report"]
