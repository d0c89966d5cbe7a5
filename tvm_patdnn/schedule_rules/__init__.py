"""Schedule rules in the style of TVM's dlight: ``apply(func, target, tunable) -> Schedule | None``."""

from .dense_conv_cpu import DenseConv2dCPU
from .matmul_cpu import MatmulCPU
from .pattern_conv_cpu import PatternConvCPU
from .pattern_conv_gpu import PatternConvGPU

__all__ = ["DenseConv2dCPU", "MatmulCPU", "PatternConvCPU", "PatternConvGPU"]
