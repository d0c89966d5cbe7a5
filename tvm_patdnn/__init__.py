"""tvm_patdnn: PatDNN pattern-sparse CNN inference on TVM."""

from .errors import PatDNNError

__all__ = ["PatDNNError"]
