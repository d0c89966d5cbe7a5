"""Relax passes of tvm_patdnn."""

from .dense_conv_rewrite import DenseConvRewrite
from .depthwise_conv_rewrite import DepthwiseConvRewrite
from .fully_connected_rewrite import FullyConnectedRewrite
from .pattern_conv_rewrite import PatternConvRewrite, conv_report
from .sparse_pointwise_rewrite import SparsePointwiseRewrite
from .unit_reduction_rewrite import UnitReductionRewrite
from .winograd_conv_rewrite import WinogradConvRewrite

__all__ = ["DenseConvRewrite", "DepthwiseConvRewrite", "FullyConnectedRewrite", "PatternConvRewrite", "SparsePointwiseRewrite",
           "UnitReductionRewrite", "WinogradConvRewrite", "conv_report"]
