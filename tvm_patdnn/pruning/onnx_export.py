"""ONNX export of a pruned PyTorch model that proves the zeros survived it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from ..errors import PatDNNError
from ..fileio import save_model_atomic
from ..torch_frontend import export_onnx
from .sparsifier import weight_fqn

__all__ = ["export_pruned_onnx"]


def _tensor(model: nn.Module, fqn: str) -> torch.Tensor | None:
    """The tensor ``fqn`` names, as the model computes with it (masked, while a mask is on)."""
    owner, _, leaf = fqn.rpartition(".")
    try:
        value = getattr(model.get_submodule(owner), leaf, None)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def export_pruned_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    check_fqns: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to ONNX and verify that pruned weights stayed exactly 0.0.

    Exported by ``torch_frontend.export_onnx`` (TorchScript exporter, eval mode, dynamic batch),
    which folds BatchNorm into the preceding conv: that rescales each filter but cannot create
    nonzeros, so each pruned conv weight (``check_fqns``: default, every conv and Linear weight
    with a zero) must reappear as an initializer with exactly the same zero positions. The file
    is written atomically. Returns the ``onnx.ModelProto``.
    """
    if check_fqns is None:
        check_fqns = [weight_fqn(n) for n, m in model.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear)) and bool((m.weight == 0).any())]
    tensors = {fqn: _tensor(model, fqn) for fqn in check_fqns}
    unknown = [fqn for fqn, tensor in tensors.items() if tensor is None]
    if unknown:
        raise PatDNNError(f"check_fqns names tensors the model does not have: {unknown}")
    proto = export_onnx(model, (example_input,), opset=opset, dynamic_batch=True)
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    used: set[str] = set()
    for fqn, tensor in tensors.items():
        zeros = (tensor.detach().cpu().numpy() == 0)
        candidates = [fqn] if fqn in initializers else [n for n, a in initializers.items() if a.shape == zeros.shape and n not in used]
        match = next((n for n in candidates if np.array_equal(initializers[n] == 0, zeros)), None)
        if match is None:
            raise PatDNNError(f"ONNX export of {fqn}: no initializer keeps its zeros exactly (sparsity lost in export)")
        if np.signbit(initializers[match][zeros]).any():
            raise PatDNNError(f"ONNX export of {fqn}: pruned weights are -0.0, not +0.0")
        used.add(match)
    save_model_atomic(proto, Path(path))
    return proto
