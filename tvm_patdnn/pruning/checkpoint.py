"""Checkpoints of a pruning run: model, optimizer and pruner state with the epoch reached, in one
file written atomically (an interrupted run leaves the previous checkpoint, never a truncated one).

Model weights are stored under their plain names (``conv.weight``), not under the
``conv.parametrizations.weight.original`` a mask gives them while it is on, so a checkpoint
loads into a model with or without masks (a prepared one to resume, a bare one to evaluate), and
checkpoints written before the pruner used parametrizations still load.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import PatDNNError
from ..fileio import write_bytes_atomic

__all__ = ["save_checkpoint", "load_checkpoint"]


class ResumablePruner(Protocol):
    """What a checkpoint needs of a pruner (``admm.PatternADMMPruner`` is one): declared here so
    this module does not import the pruner that imports it."""

    phase: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def attach(self, optimizer: torch.optim.Optimizer) -> None: ...

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _plain(key: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight`` (other keys unchanged)."""
    return _PARAMETRIZED.sub(r"\1\2", key)


def _load_model_state(model: nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict`` from plain names; a mask (``FakeSparsity`` saves none) is not
    expected in the file, every weight the model saves is."""
    own = model.state_dict()
    names = {_plain(key): key for key in own}
    result = model.load_state_dict({names.get(key, key): value for key, value in saved.items()}, strict=False)
    missing = [key for key in result.missing_keys if key in own]
    if missing or result.unexpected_keys:
        raise PatDNNError(f"checkpoint {path} does not fit the model: missing {missing}, "
                          f"unexpected {result.unexpected_keys}")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    pruner: ResumablePruner | None = None,
    epoch: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save model, optimizer and pruner state with the epoch reached, atomically."""
    buffer = io.BytesIO()
    torch.save({
        "model": {_plain(key): value for key, value in model.state_dict().items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "pruner": None if pruner is None else pruner.state_dict(),
        "epoch": int(epoch),
        "extra": extra or {},
    }, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    pruner: ResumablePruner | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns ``{"epoch": ..., "extra": ...}``.

    The pruner must be prepared on ``model`` (same config); if it was in the masked phase the
    optimizer is re-attached so the pruned weights' momentum stays cleared.
    """
    path = Path(path)
    if not path.is_file():
        raise PatDNNError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or foreign file: torch raises many types
        raise PatDNNError(f"cannot read checkpoint {path}: {exc}") from exc
    _load_model_state(model, state["model"], path)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise PatDNNError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if pruner is not None:
        if state["pruner"] is None:
            raise PatDNNError(f"checkpoint {path} holds no pruner state")
        pruner.load_state_dict(state["pruner"])
        if pruner.phase == "masked" and optimizer is not None:
            pruner.attach(optimizer)
    return {"epoch": state["epoch"], "extra": state["extra"]}
