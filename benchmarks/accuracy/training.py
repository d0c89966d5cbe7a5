"""The training loop of the accuracy experiments (and of the ADMM tests, so they run what the
experiments run): minibatches of in-memory tensors, one cross-entropy epoch with an optional
ADMM pruner, top-1 accuracy. The library ships no training loop, as torch.ao.pruning ships none.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tvm_patdnn.pruning.admm import PatternADMMPruner

__all__ = ["batches", "train_epoch", "evaluate"]


def _progress_enabled(progress: bool | None) -> bool:
    """Progress bars only on an interactive terminal unless asked explicitly (logs stay clean)."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of in-memory tensors (a DataLoader's workers cost more than they save here)."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    pruner: PatternADMMPruner | None = None,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    scheduler: Any = None,
    progress: bool | None = None,
    desc: str = "train",
) -> float:
    """One epoch of cross-entropy training; with a pruner in the ADMM phase its penalty is
    added and ``pruner.step()`` runs after each optimizer step. ``scheduler`` (if any) is
    stepped per batch. Returns the mean cross-entropy (without the ADMM penalty)."""
    from tqdm import tqdm

    model.train()
    total, seen = 0.0, 0
    n_batches = math.ceil(len(x) / batch_size)
    bar = tqdm(batches(x, y, batch_size, generator=generator), total=n_batches, desc=desc,
               disable=not _progress_enabled(progress), leave=False)
    for xb, yb in bar:
        ce = nn.functional.cross_entropy(model(xb), yb)
        loss = ce if pruner is None else ce + pruner.admm_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if pruner is not None:
            pruner.step()
        total += float(ce.detach()) * len(xb)
        seen += len(xb)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (the model's train/eval mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size, shuffle=False):
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(len(x), 1)
