"""Relax passes of tvm_patdnn."""

from .dense_conv_rewrite import DenseConvRewrite
from .depthwise_conv_rewrite import DepthwiseConvRewrite
from .pattern_conv_rewrite import PatternConvRewrite, conv_report
from .sparse_pointwise_rewrite import SparsePointwiseRewrite
from .winograd_conv_rewrite import WinogradConvRewrite

__all__ = ["DenseConvRewrite", "DepthwiseConvRewrite", "PatternConvRewrite", "conv_report", "SparsePointwiseRewrite", "WinogradConvRewrite"]
