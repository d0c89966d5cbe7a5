"""Schedule rules in the style of TVM's dlight: ``apply(func, target, tunable) -> Schedule | None``.

Each subclasses dlight's ``CPUScheduleRule`` or ``GPUScheduleRule`` and, like dlight's own rules,
returns None first when ``is_target_available(target)`` says no: ``ApplyDefaultSchedule`` offers
every function to every rule in turn and does not check the target itself."""

from .dense_conv_cpu import DenseConv2dCPU
from .matmul_cpu import MatmulCPU
from .pattern_conv_cpu import PatternConvCPU
from .pattern_conv_gpu import PatternConvGPU

__all__ = ["DenseConv2dCPU", "MatmulCPU", "PatternConvCPU", "PatternConvGPU"]
