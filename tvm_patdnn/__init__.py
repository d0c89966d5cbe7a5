"""tvm_patdnn: PatDNN pattern-sparse CNN inference on TVM.

``compile`` imports a (pattern-pruned) model, rewrites its pattern-sparse convolutions into
the pattern-conv operator and builds it with TVM; ``tvm_patdnn.pruning`` makes such models.
The compiler is imported on first use so that pruning alone does not pay TVM's import time.
"""

from .errors import PatDNNError

__all__ = ["CompiledModel", "ConvRecord", "PatDNNError", "compile", "deploy", "inspect", "load", "tune"]


def __getattr__(name: str):
    if name in ("compile", "CompiledModel", "inspect", "load"):
        from . import compiler

        return getattr(compiler, name)
    if name == "deploy":
        from .phone.deploy import deploy

        return deploy
    if name == "tune":
        from .tuning.tuner import tune

        return tune
    if name == "ConvRecord":
        from .report import ConvRecord

        return ConvRecord
    raise AttributeError(f"module 'tvm_patdnn' has no attribute {name!r}")
