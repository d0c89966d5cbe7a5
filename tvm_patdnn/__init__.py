"""tvm_patdnn: PatDNN pattern-sparse CNN inference on TVM.

``compile`` imports a (pattern-pruned) model, rewrites its pattern-sparse convolutions into
the pattern-conv operator and builds it with TVM; ``tvm_patdnn.pruning`` makes such models.
"""

from .compiler import CompiledModel, compile
from .errors import PatDNNError
from .report import ConvRecord

__all__ = ["CompiledModel", "ConvRecord", "PatDNNError", "compile"]
