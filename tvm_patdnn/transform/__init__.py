"""Relax passes of tvm_patdnn."""

from .dense_conv_rewrite import DenseConvRewrite
from .pattern_conv_rewrite import PatternConvRewrite, conv_report
from .winograd_conv_rewrite import WinogradConvRewrite

__all__ = ["DenseConvRewrite", "PatternConvRewrite", "conv_report", "WinogradConvRewrite"]
