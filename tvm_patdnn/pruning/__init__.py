"""PatDNN pruning: pattern/connectivity projections (3x3) and block projections (1x1 convs and
FC layers), one-shot ONNX pruning, ADMM training.

The numpy core (:mod:`.projection`) and ONNX pruning (:mod:`.onnx_prune`) need no torch, so
this package imports without it. The torch modules are imported by name (the ``train`` extra):
:mod:`.sparsifier` (the masks, a ``torch.ao.pruning`` sparsifier), :mod:`.penalty` (the ADMM
penalty and its rho schedule), :mod:`.admm` (the pruner that runs both), :mod:`.checkpoint` and
:mod:`.onnx_export` (pruned model to ONNX).
"""

from .onnx_prune import (
    LayerRecord,
    PruneResult,
    load_onnx_model,
    prune_onnx,
    save_model_atomic,
    write_bytes_atomic,
)
from .projection import (
    assign_patterns,
    block_grid,
    check_rate,
    kept_block_count,
    kept_kernel_count,
    parse_block,
    pattern_frequencies,
    pointwise_mask,
    pointwise_reason,
    project_connectivity,
    project_pattern_and_connectivity,
    project_patterns,
    project_pointwise,
    prunable_reason,
    select_pattern_set,
    top_shape,
)

__all__ = [
    # projections (numpy)
    "top_shape",
    "pattern_frequencies",
    "select_pattern_set",
    "assign_patterns",
    "project_patterns",
    "kept_kernel_count",
    "project_connectivity",
    "project_pattern_and_connectivity",
    "prunable_reason",
    "check_rate",
    "parse_block",
    "block_grid",
    "kept_block_count",
    "pointwise_mask",
    "project_pointwise",
    "pointwise_reason",
    # one-shot ONNX pruning
    "LayerRecord",
    "PruneResult",
    "load_onnx_model",
    "prune_onnx",
    "save_model_atomic",
    "write_bytes_atomic",
]
