"""PatDNN's extended ADMM pattern + connectivity pruning for PyTorch models.

The API follows ``torch.ao.pruning``: make a pruner, ``prepare`` it on a model, add
``admm_loss()`` to the training loss and call ``step()``; then ``hard_prune()`` projects every
pruned weight onto both constraints and sets its mask, which keeps the removed weights exactly
zero through masked retraining; ``squash_mask()`` makes the result permanent::

    pruner = PatternADMMPruner(n_patterns=8)
    pruner.prepare(model)                       # all 3x3 convs but the first, 3.6x connectivity
    for epoch in range(admm_epochs):
        for x, y in batches:
            loss = criterion(model(x), y) + pruner.admm_loss()
            ...; optimizer.step(); pruner.step()  # a Z/Y/U/V round every admm_interval steps
    pruner.hard_prune(optimizer)                # project, set the masks, clear pruned momentum
    ...masked retraining...
    pruner.squash_mask()
    export_pruned_onnx(model, example_input, "pruned.onnx")

The pruner is three torch.ao-shaped pieces run in two phases: a
:class:`~.sparsifier.PatternSparsifier` (``BaseSparsifier`` with ``FakeSparsity`` masks) owns
the layers, the pattern set and the masks; an :class:`~.penalty.ADMMPenalty` with its
:class:`~.penalty.RhoSchedule` pulls the weights towards the constraints first. Checkpoints
(:mod:`.checkpoint`) and the ONNX export (:mod:`.onnx_export`) are importable from here too. These
modules import torch; no module of the package imports them at module level, so
``import tvm_patdnn.pruning`` works without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PatDNNError
from .checkpoint import load_checkpoint, save_checkpoint
from .onnx_export import export_pruned_onnx
from .penalty import ADMMPenalty, RhoSchedule
from .sparsifier import DEFAULT_BLOCK, DEFAULT_CONNECTIVITY, DEFAULT_POINTWISE, PatternSparsifier, default_config

__all__ = [
    "PatternADMMPruner",
    "magnitude_prune",
    "default_config",
    "save_checkpoint",
    "load_checkpoint",
    "export_pruned_onnx",
]


class PatternADMMPruner:
    """Extended-ADMM pattern + connectivity pruner (PatDNN, ASPLOS 2020).

    Args:
        n_patterns: size of the model-wide pattern set (PatDNN uses 6–8).
        entries: taps kept per kernel (4 for 3x3 kernels in PatDNN).
        force_centre: always keep the centre tap, as PatDNN's pattern library does.
        rho, rho_growth, rho_max: the penalty's :class:`~.penalty.RhoSchedule` (initial rho,
            factor per ADMM round, cap; why the cap is 0.1 is measured there). Plan a masked
            retraining after ADMM: at this cap the hard-pruned model is far below its final accuracy.
        admm_interval: ``step()`` calls per ADMM round (1: every call is a round, for callers
            that call ``step()`` once per epoch; set it to the batches per round otherwise).
        default_connectivity: rate used by 3x3 config entries that do not give one.
        pointwise: keep rate of 1x1 convs (``None``: leave them dense) in the default config
            and for ``"pointwise"`` entries that give no rate.
        pointwise_block: granularity of 1x1/Linear pruning, output x input channels kept or
            removed together (:func:`projection.pointwise_mask`); entries may override it.
        fc: keep rate of Linear layers (all but the last) in the default config; ``None``: dense.

    ``sparsifier``, ``schedule`` and (once prepared) ``penalty`` are the pieces.
    """

    def __init__(
        self,
        n_patterns: int = 8,
        entries: int = 4,
        *,
        force_centre: bool = True,
        rho: float = 1e-2,
        rho_growth: float = 1.5,
        rho_max: float = 0.1,
        admm_interval: int = 1,
        default_connectivity: float | None = DEFAULT_CONNECTIVITY,
        pointwise: float | None = DEFAULT_POINTWISE,
        pointwise_block: Sequence[int] | str = DEFAULT_BLOCK,
        fc: float | None = None,
    ) -> None:
        self.schedule = RhoSchedule(rho, rho_growth, rho_max)
        if admm_interval < 1:
            raise PatDNNError(f"admm_interval must be at least 1, got {admm_interval}")
        self.admm_interval = admm_interval
        self.sparsifier = PatternSparsifier(n_patterns, entries, force_centre=force_centre,
                                            connectivity=default_connectivity, pointwise=pointwise,
                                            block=pointwise_block, fc=fc)
        self.penalty: ADMMPenalty | None = None
        self.phase = "unprepared"  # -> "admm" -> "masked" -> "squashed"

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module, config: Sequence[dict[str, Any]] | None = None) -> "PatternADMMPruner":
        """Validate the layers to prune, choose the pattern set from the current (pretrained)
        weights, put an all-ones mask on each, and initialise Z, Y to the projections of W and
        the duals to zero."""
        if self.phase != "unprepared":
            raise PatDNNError("this pruner is already prepared; make a new one for another model")
        self.sparsifier.prepare(model, config)
        self.penalty = ADMMPenalty(self.sparsifier, self.schedule, self.admm_interval)
        self.phase = "admm"
        return self

    @property
    def patterns(self) -> list[int]:
        """The model-wide pattern set (bit masks), chosen at :meth:`prepare`."""
        return self.sparsifier.patterns

    @property
    def tensor_fqns(self) -> list[str]:
        """Names of the pruned weights, in config order."""
        return self.sparsifier.tensor_fqns

    @property
    def rho(self) -> float:
        return self.schedule.rho

    @property
    def steps(self) -> int:
        return 0 if self.penalty is None else self.penalty.steps

    @property
    def rounds(self) -> int:
        return 0 if self.penalty is None else self.penalty.rounds

    # ------------------------------------------------------------------ ADMM phase
    def admm_loss(self) -> torch.Tensor:
        """``sum rho/2 (||W - Z + U||^2 + ||W - Y + V||^2)``: add it to the training loss.

        Zero once the pruner has hard-pruned, so one training loop serves both phases.
        """
        self._require("admm_loss", "admm", "masked", "squashed")
        if self.phase != "admm":
            return torch.zeros((), device=self.sparsifier.parameter(self.sparsifier.groups[0]).device)
        return self.penalty.loss()

    def step(self) -> bool:
        """Count one training step; run an ADMM round every ``admm_interval`` steps.

        Returns whether a round ran. A no-op after hard pruning.
        """
        self._require("step", "admm", "masked", "squashed")
        return self.phase == "admm" and self.penalty.step()

    def admm_update(self) -> None:
        """One ADMM round: Z, Y projections, dual ascent, then rho growth (duals rescaled)."""
        self._require("admm_update", "admm")
        self.penalty.update()

    def residuals(self) -> dict[str, dict[str, float]]:
        """Relative primal residuals per layer (:meth:`.penalty.ADMMPenalty.residuals`)."""
        self._require("residuals", "admm")
        return self.penalty.residuals()

    # ------------------------------------------------------------------ hard pruning and masks
    def hard_prune(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """Project every pruned weight onto both constraints and keep it there from now on.

        The masks (``FakeSparsity``) keep removed weights out of the forward pass and their
        gradient at zero; with ``optimizer`` (or later :meth:`attach`) the removed weights'
        momentum is cleared too, so the stored weights stay +0.0. Returns the boolean masks.
        """
        self._require("hard_prune", "admm")
        self.sparsifier.step()
        self.penalty.release()
        self.phase = "masked"
        if optimizer is not None:
            self.attach(optimizer)
        return self.masks()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear the removed weights' momentum in ``optimizer`` (see :meth:`.PatternSparsifier.clear_optimizer_state`)."""
        self._require("attach", "masked")
        self.sparsifier.clear_optimizer_state(optimizer)

    def apply_masks(self) -> None:
        """Set every removed weight back to exactly +0.0."""
        self.sparsifier.apply_masks()

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks by tensor name (empty before hard pruning)."""
        return self.sparsifier.masks() if self.phase in ("masked", "squashed") else {}

    def squash_mask(self) -> None:
        """Make pruning permanent: the masks' parametrizations are removed, the zeros stay in the
        weights (the masks stay readable through :meth:`masks`)."""
        self._require("squash_mask", "masked")
        self.sparsifier.squash_mask()
        self.phase = "squashed"

    # ------------------------------------------------------------------ reporting
    def report(self) -> list[dict[str, Any]]:
        """Per pruned layer: kind, nonzeros, compression, counts (:meth:`.PatternSparsifier.report`)."""
        return self.sparsifier.report()

    def verify(self) -> None:
        """Raise :class:`PatDNNError` unless every constraint holds exactly (after hard pruning)."""
        self._require("verify", "masked", "squashed")
        self.sparsifier.verify()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: hyperparameters, patterns, rho, counters, ADMM tensors, masks."""
        self._require("state_dict", "admm", "masked", "squashed")

        def clone(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach().clone()

        s = self.sparsifier
        masks = self.masks()
        targets = []
        for group in s.groups:
            fqn = group["tensor_fqn"]
            t = self.penalty.variables.get(fqn)
            targets.append({"tensor_fqn": fqn, "connectivity": group["connectivity"], "block": group["block"],
                            **{k: None if t is None else clone(getattr(t, k)) for k in ("z", "y", "u", "v")},
                            "mask": clone(masks.get(fqn))})
        return {
            "hyper": {"n_patterns": s.n_patterns, "entries": s.entries, "force_centre": s.force_centre,
                      "rho_growth": self.schedule.growth, "rho_max": self.schedule.rho_max,
                      "admm_interval": self.admm_interval, "pointwise": s.pointwise, "pointwise_block": s.block,
                      "fc": s.fc},
            "patterns": list(s.patterns),
            "phase": self.phase,
            "rho": self.schedule.rho,
            "steps": self.penalty.steps,
            "rounds": self.penalty.rounds,
            "targets": targets,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a pruner prepared on the same model layout
        (load the model weights first; the masks are set again)."""
        self._require("load_state_dict", "admm")
        names = [t["tensor_fqn"] for t in state["targets"]]
        if names != self.tensor_fqns:
            raise PatDNNError(f"checkpoint prunes {names}, this pruner was prepared for {self.tensor_fqns}")
        s, hyper = self.sparsifier, state["hyper"]
        s.n_patterns, s.entries, s.force_centre = hyper["n_patterns"], hyper["entries"], hyper["force_centre"]
        s.pointwise, s.block, s.fc = hyper["pointwise"], hyper["pointwise_block"], hyper["fc"]
        self.schedule.growth, self.schedule.rho_max = hyper["rho_growth"], hyper["rho_max"]
        self.admm_interval = self.penalty.interval = hyper["admm_interval"]
        s.patterns = [int(p) for p in state["patterns"]]
        self.schedule.rho = float(state["rho"])
        self.penalty.steps, self.penalty.rounds = int(state["steps"]), int(state["rounds"])
        for group, saved in zip(s.groups, state["targets"]):
            group["connectivity"] = saved["connectivity"]
            if (None if saved.get("block") is None else tuple(saved["block"])) != group["block"]:
                raise PatDNNError(f"{group['tensor_fqn']}: checkpoint block {saved.get('block')} differs from "
                                  f"this pruner's {group['block']}")
            t = self.penalty.variables[group["tensor_fqn"]]
            t.z, t.y, t.u, t.v = (None if saved[k] is None else saved[k].to(t.weight.device).clone()
                                  for k in ("z", "y", "u", "v"))
            if saved["mask"] is not None:
                s.state[group["tensor_fqn"]]["mask"].copy_(saved["mask"])
        if state["phase"] in ("masked", "squashed"):
            self.penalty.release()
            self.phase = "masked"
            if state["phase"] == "squashed":
                self.squash_mask()

    def _require(self, what: str, *phases: str) -> None:
        if self.phase not in phases:
            raise PatDNNError(f"{what}() needs the pruner in phase {' or '.join(phases)}, it is {self.phase}")


def magnitude_prune(
    model: nn.Module,
    config: Sequence[dict[str, Any]] | None = None,
    *,
    n_patterns: int = 8,
    entries: int = 4,
    force_centre: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> PatternADMMPruner:
    """Baseline: project the weights onto the same constraints right away, no ADMM.

    Returns a pruner in the masked phase, so fine-tuning uses exactly the masking of the
    ADMM path and the two methods differ only in how the weights reached the constraints.
    """
    pruner = PatternADMMPruner(n_patterns, entries, force_centre=force_centre)
    pruner.prepare(model, config)
    pruner.hard_prune(optimizer)
    return pruner
