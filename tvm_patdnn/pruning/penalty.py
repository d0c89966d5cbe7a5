"""The extended-ADMM penalty that pulls weights towards PatDNN's constraints before they are
masked, and the schedule of its weight rho.

The problem solved is ``min loss(W)`` s.t. ``W in S`` (every kernel within one of the selected
patterns) and ``W in S'`` (only ``round(O*I/rate)`` kernels nonzero). ADMM splits it with
auxiliary ``Z`` (projected on S), ``Y`` (projected on S') and scaled duals ``U``, ``V``::

    loss(W) + rho/2 ||W - Z + U||^2 + rho/2 ||W - Y + V||^2
    Z = P_S(W + U);  Y = P_S'(W + V);  U += W - Z;  V += W - Y;  rho <- min(rho*g, rho_max)

1x1 convolutions and Linear layers have a single constraint, "at most ``round(blocks/rate)``
nonzero blocks" (:func:`projection.project_pointwise`), so they carry only ``Z``/``U``.

The penalty reads the layers, rates and patterns of a prepared
:class:`~.sparsifier.PatternSparsifier` and works on its stored weights, as torch.ao's
schedulers work on a sparsifier; the projections are the numpy ones of :mod:`.projection`, so
the ADMM phase, the masks and the ONNX pruner choose patterns identically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import PatDNNError
from . import projection as P
from .sparsifier import PatternSparsifier

__all__ = ["ADMMPenalty", "ADMMVariables", "RhoSchedule"]


class RhoSchedule:
    """rho grows by ``growth`` after every ADMM round, up to ``rho_max``.

    Growing rho progressively forces W onto the constraint sets, as in PatDNN's schedule; it
    starts small so the first rounds stay close to the dense optimum. The scale assumes a
    batch-mean loss and SGD with lr ~0.01 and momentum 0.9: at rho ~1 the penalty pulls a
    weight several percent of the way to its projection per step, so W reaches the constraints
    within a few rounds at the cap. Plan ~10+ rounds of about 50–100 steps each (measured on
    MNIST: with 8 rounds ending at rho=1 the relative residuals fell to ~0.05 and hard pruning
    cost ~2 pp instead of the 17 pp of one-shot projection).

    The cap is 0.1, not 1: W then stays further from the constraints when ADMM ends (hard pruning
    costs more), but the masked retraining that follows ends higher, because the loss keeps
    re-choosing which kernels, patterns and blocks survive instead of freezing near magnitude
    pruning's choice within two epochs. Fashion-MNIST, 8x (README "Pruning"): bottleneck ResNet
    −0.31 pp from dense with cap 0.1 against −0.72 pp with cap 1 (two seeds, ADMM 6 + retrain 18
    epochs); small VGG −0.44 pp against −0.99 pp (three seeds, ADMM 4 + retrain 3; every seed
    better); the MNIST CNN +0.15 pp against +0.19 pp (two seeds: a tie).
    """

    def __init__(self, rho: float = 1e-2, growth: float = 1.5, rho_max: float = 0.1) -> None:
        if not (rho > 0 and rho_max >= rho and growth >= 1):
            raise PatDNNError(f"need 0 < rho <= rho_max and rho_growth >= 1 (got {rho}, {rho_max}, {growth})")
        self.rho = float(rho)
        self.growth = float(growth)
        self.rho_max = float(rho_max)

    def step(self) -> float:
        """Advance one round; returns ``old rho / new rho``, the factor the scaled duals are
        multiplied by: ``U`` stands for ``lambda / rho``, so without it the dual pull would
        jump with every rho increase."""
        new_rho = min(self.rho * self.growth, self.rho_max)
        scale = self.rho / new_rho
        self.rho = new_rho
        return scale


@dataclass
class ADMMVariables:
    """One pruned weight and its ADMM variables (``y``/``v`` only for a 3x3 layer with a rate)."""

    weight: torch.nn.Parameter
    z: torch.Tensor
    y: torch.Tensor | None
    u: torch.Tensor
    v: torch.Tensor | None


def _project(fn: Callable[..., np.ndarray], w: torch.Tensor, *args: Any) -> torch.Tensor:
    """A numpy projection of :mod:`.projection` applied to a tensor (same device and dtype)."""
    out = fn(w.detach().cpu().numpy(), *args)
    return torch.from_numpy(np.ascontiguousarray(out)).to(w.device, w.dtype)


class ADMMPenalty:
    """``rho/2 (||W - Z + U||^2 + ||W - Y + V||^2)`` over a sparsifier's weights, and its rounds.

    Add :meth:`loss` to the training loss and call :meth:`step` after every optimizer step: a
    Z/Y/U/V round (:meth:`update`) runs every ``interval`` steps (1: every call is a round, for
    callers that step once per epoch; set it to the batches per round otherwise). Z and Y start
    as the projections of the current weights, the duals at zero.
    """

    def __init__(self, sparsifier: PatternSparsifier, schedule: RhoSchedule | None = None, interval: int = 1) -> None:
        if interval < 1:
            raise PatDNNError(f"admm_interval must be at least 1, got {interval}")
        if not sparsifier.groups:
            raise PatDNNError("the ADMM penalty needs a prepared sparsifier")
        self.sparsifier = sparsifier
        self.schedule = schedule if schedule is not None else RhoSchedule()
        self.interval = interval
        self.steps = 0
        self.rounds = 0
        self.variables: dict[str, ADMMVariables] = {}
        with torch.no_grad():
            for group in sparsifier.groups:
                weight = sparsifier.parameter(group)
                w = weight.detach()
                if group["block"] is None:
                    z = self._pattern(w)
                    y = None if group["connectivity"] is None else _project(P.project_connectivity, w, group["connectivity"])
                else:
                    z, y = _project(P.project_pointwise, w, group["connectivity"], group["block"]), None
                self.variables[group["tensor_fqn"]] = ADMMVariables(
                    weight=weight, z=z, y=y, u=torch.zeros_like(w), v=None if y is None else torch.zeros_like(w))

    @property
    def rho(self) -> float:
        return self.schedule.rho

    def _pattern(self, w: torch.Tensor) -> torch.Tensor:
        return _project(P.project_patterns, w, self.sparsifier.patterns)

    def loss(self) -> torch.Tensor:
        """``sum rho/2 (||W - Z + U||^2 + ||W - Y + V||^2)`` (zero once the variables are released)."""
        device = next(iter(self.variables.values())).weight.device if self.variables else None
        total = torch.zeros((), device=device)
        for t in self.variables.values():
            total = total + (t.weight - t.z + t.u).pow(2).sum()
            if t.y is not None:
                total = total + (t.weight - t.y + t.v).pow(2).sum()
        return 0.5 * self.rho * total

    def step(self) -> bool:
        """Count one training step; run a round every ``interval`` steps. Returns whether one ran."""
        self.steps += 1
        if self.steps % self.interval:
            return False
        self.update()
        return True

    @torch.no_grad()
    def update(self) -> None:
        """One ADMM round: Z, Y projections, dual ascent, then the schedule's rho step (duals rescaled)."""
        scale = self.schedule.step()
        for group in self.sparsifier.groups:
            t = self.variables[group["tensor_fqn"]]
            w = t.weight.detach()
            if group["block"] is not None:
                t.z = _project(P.project_pointwise, w + t.u, group["connectivity"], group["block"])
                t.u.add_(w - t.z).mul_(scale)
                continue
            t.z = self._pattern(w + t.u)
            t.u.add_(w - t.z).mul_(scale)
            if t.y is not None:
                t.y = _project(P.project_connectivity, w + t.v, group["connectivity"])
                t.v.add_(w - t.y).mul_(scale)
        self.rounds += 1

    @torch.no_grad()
    def residuals(self) -> dict[str, dict[str, float]]:
        """Relative primal residuals ``||W - Z|| / ||W||`` and ``||W - Y|| / ||W||`` per layer:
        how far the weights still are from each constraint (they should fall towards 0). A
        1x1/Linear layer reports its single block constraint as ``connectivity``."""
        out = {}
        for group in self.sparsifier.groups:
            t = self.variables[group["tensor_fqn"]]
            norm = float(t.weight.norm()) or 1.0
            if group["block"] is not None:  # one constraint, its connectivity (Z)
                out[group["tensor_fqn"]] = {"pattern": 0.0, "connectivity": float((t.weight - t.z).norm()) / norm}
                continue
            out[group["tensor_fqn"]] = {"pattern": float((t.weight - t.z).norm()) / norm,
                                        "connectivity": 0.0 if t.y is None else float((t.weight - t.y).norm()) / norm}
        return out

    def release(self) -> None:
        """Drop Z/Y/U/V once the weights are masked (the step and round counts stay)."""
        self.variables.clear()
