"""Tensor-expression operators of tvm_patdnn."""

from .dense_conv import DenseConvSpec, dense_conv_primfunc
from .depthwise_conv import DepthwiseConvSpec, depthwise_conv_primfunc
from .direct_conv import DirectConvSpec, direct_conv_primfunc
from .fully_connected import FullyConnectedSpec, fully_connected_primfunc
from .pattern_conv import PatternConvSpec, pattern_conv2d, pattern_conv2d_primfunc
from .pattern_conv_2x2 import pattern_conv_2x2_primfunc
from .pattern_conv_shifted_rows import pattern_conv_shifted_rows_primfunc
from .pattern_conv_blocked import pattern_conv_blocked_primfunc
from .sparse_pointwise import SparsePointwiseSpec, sparse_pointwise_primfunc
from .sparse_pointwise_gpu import SparsePointwiseGPUSpec, sparse_pointwise_gpu_primfunc
from .winograd_conv import WinogradConvSpec, winograd_conv_primfunc

__all__ = ["DenseConvSpec", "dense_conv_primfunc", "DirectConvSpec", "direct_conv_primfunc", "DepthwiseConvSpec",
           "depthwise_conv_primfunc", "FullyConnectedSpec", "fully_connected_primfunc", "PatternConvSpec", "pattern_conv2d",
           "pattern_conv2d_primfunc", "pattern_conv_2x2_primfunc", "pattern_conv_shifted_rows_primfunc",
           "pattern_conv_blocked_primfunc", "SparsePointwiseSpec",
           "sparse_pointwise_primfunc", "SparsePointwiseGPUSpec",
           "sparse_pointwise_gpu_primfunc", "WinogradConvSpec", "winograd_conv_primfunc"]
