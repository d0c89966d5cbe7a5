"""PatDNN's extended ADMM pattern + connectivity pruning for PyTorch models.

The API follows ``torch.ao.pruning``: make a pruner, ``prepare`` it on a model, add
``admm_loss()`` to the training loss and call ``step()``; then ``hard_prune()`` projects every
pruned weight onto both constraints and installs masks that keep the removed weights exactly
zero through masked retraining; ``squash_mask()`` makes the result permanent::

    pruner = PatternADMMPruner(n_patterns=8)
    pruner.prepare(model)                       # all 3x3 convs but the first, 3.6x connectivity
    for epoch in range(admm_epochs):
        for x, y in batches:
            loss = criterion(model(x), y) + pruner.admm_loss()
            ...; optimizer.step(); pruner.step()  # a Z/Y/U/V round every admm_interval steps
    pruner.hard_prune(optimizer)                # project, install masks, hook the optimizer
    ...masked retraining...
    pruner.squash_mask()
    export_pruned_onnx(model, example_input, "pruned.onnx")

The problem solved is ``min loss(W)`` s.t. ``W in S`` (every kernel within one of the selected
patterns) and ``W in S'`` (only ``round(O*I/rate)`` kernels nonzero). ADMM splits it with
auxiliary ``Z`` (projected on S), ``Y`` (projected on S') and scaled duals ``U``, ``V``::

    loss(W) + rho/2 ||W - Z + U||^2 + rho/2 ||W - Y + V||^2
    Z = P_S(W + U);  Y = P_S'(W + V);  U += W - Z;  V += W - Y;  rho <- min(rho*g, rho_max)

The scaled duals are divided by the growth factor whenever rho grows, because ``U`` stands
for ``lambda / rho``: without it the dual pull jumps with every rho increase.

1x1 convolutions (and, when asked, Linear layers) have a single constraint, "at most
``round(blocks/rate)`` nonzero blocks" (:func:`projection.project_pointwise`), so they carry
only ``Z``/``U``: ``Z = P(W + U)``, ``U += W - Z``.

The projections themselves are the numpy ones of :mod:`tvm_patdnn.pruning.projection`, so
the ADMM phase, the magnitude baseline and the ONNX pruner choose patterns identically.
This module imports torch; nothing in the package imports it at module level.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PatDNNError
from ..kernel_patterns import kernel_masks
from . import projection as P
from .onnx_prune import save_model_atomic, write_bytes_atomic

__all__ = [
    "PatternADMMPruner",
    "magnitude_prune",
    "default_config",
    "save_checkpoint",
    "load_checkpoint",
    "export_pruned_onnx",
    "batches",
    "train_epoch",
    "evaluate",
]

#: PatDNN's connectivity rate for the 8x setting (9/4 from 4-entry patterns x 3.6 = 8.1x).
DEFAULT_CONNECTIVITY = 3.6
#: Rate and granularity of 1x1 convs: keep 1/4 of the weights in blocks of 4 output channels.
DEFAULT_POINTWISE = 4.0
DEFAULT_BLOCK = (4, 1)


def _progress_enabled(progress: bool | None) -> bool:
    """Progress bars only on an interactive terminal unless asked explicitly (logs stay clean)."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def _pattern_taps(assigned: np.ndarray, kernel_size: int) -> np.ndarray:
    """Expand ``(O, I)`` pattern bit masks to a boolean ``(O, I, K, K)`` tap mask."""
    k2 = kernel_size * kernel_size
    bits = (assigned[..., None] >> np.arange(k2, dtype=np.int64)) & 1
    return bits.astype(bool).reshape(*assigned.shape, kernel_size, kernel_size)


def _conv_modules(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _fqn(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def _pointwise_conv(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1)


def default_config(
    model: nn.Module,
    connectivity: float | None = DEFAULT_CONNECTIVITY,
    pointwise: float | None = None,
    fc: float | None = None,
    block: Sequence[int] = DEFAULT_BLOCK,
) -> list[dict[str, Any]]:
    """Every prunable 3x3 conv except the first one (in module registration order); with
    ``pointwise`` every plain 1x1 conv but the first, with ``fc`` every Linear but the last.

    PatDNN keeps the first layer dense: it has few input channels, so pruning it costs
    accuracy and saves almost no work; the last Linear (the classifier) likewise decides the
    output with few weights. A 1x1/Linear layer smaller than one ``block`` is left out.
    """
    block = P.parse_block(block)
    config: list[dict[str, Any]] = []
    for index, (name, conv) in enumerate(_conv_modules(model)):
        if index == 0:
            continue
        shape = tuple(conv.weight.shape)
        if _pointwise_conv(conv):
            if pointwise is not None and P.pointwise_reason(shape, conv.groups, first_layer_dense=False) is None \
                    and shape[0] >= block[0] and shape[1] >= block[1]:
                config.append({"tensor_fqn": _fqn(name), "pointwise": pointwise, "block": block})
        elif P.prunable_reason(shape, groups=conv.groups, dilations=tuple(conv.dilation), first_layer_dense=False) is None:
            config.append({"tensor_fqn": _fqn(name), "connectivity": connectivity})
    if fc is not None:
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in linears[:-1]:
            if linear.out_features >= block[0] and linear.in_features >= block[1]:
                config.append({"tensor_fqn": _fqn(name), "fc": fc, "block": block})
    if not config:
        raise PatDNNError("the model has no prunable 3x3 (or, when asked, 1x1/Linear) layer besides the first one")
    return config


@dataclass
class _Target:
    """One pruned weight and its ADMM variables."""

    fqn: str
    param: nn.Parameter
    connectivity: float | None  # 3x3: kernel connectivity rate; 1x1/Linear: block keep rate
    block: tuple[int, int] | None  # None for a 3x3 pattern layer, the granularity of a 1x1/Linear one
    z: torch.Tensor
    y: torch.Tensor | None
    u: torch.Tensor
    v: torch.Tensor | None
    mask: torch.Tensor | None = None
    hook: Any = None


class PatternADMMPruner:
    """Extended-ADMM pattern + connectivity pruner (PatDNN, ASPLOS 2020).

    Args:
        n_patterns: size of the model-wide pattern set (PatDNN uses 6–8).
        entries: taps kept per kernel (4 for 3x3 kernels in PatDNN).
        force_centre: always keep the centre tap, as PatDNN's pattern library does.
        rho: initial ADMM penalty; small so the first rounds stay close to the dense optimum.
        rho_growth: factor applied to rho after every ADMM round (progressively forces W onto
            the constraint sets, as in PatDNN's schedule).
        rho_max: cap on rho. The scale assumes a batch-mean loss and SGD with lr ~0.01 and
            momentum 0.9: at rho ~1 the penalty pulls a weight several percent of the way to
            its projection per step, so W reaches the constraints within a few rounds at the
            cap. Plan ~10+ rounds of about 50–100 steps each (measured on MNIST: with 8
            rounds ending at rho=1 the relative residuals fell to ~0.05 and hard pruning cost
            ~2 pp instead of the 17 pp of one-shot projection).
        admm_interval: ``step()`` calls per ADMM round (1: every call is a round, for callers
            that call ``step()`` once per epoch; set it to the batches per round otherwise).
        default_connectivity: rate used by 3x3 config entries that do not give one.
        pointwise: keep rate of 1x1 convs (``None``: leave them dense) in the default config
            and for ``"pointwise"`` entries that give no rate.
        pointwise_block: granularity of 1x1/Linear pruning, output x input channels kept or
            removed together (:func:`projection.pointwise_mask`); entries may override it.
        fc: keep rate of Linear layers (all but the last) in the default config; ``None``: dense.
    """

    def __init__(
        self,
        n_patterns: int = 8,
        entries: int = 4,
        *,
        force_centre: bool = True,
        rho: float = 1e-2,
        rho_growth: float = 1.5,
        rho_max: float = 1.0,
        admm_interval: int = 1,
        default_connectivity: float | None = DEFAULT_CONNECTIVITY,
        pointwise: float | None = DEFAULT_POINTWISE,
        pointwise_block: Sequence[int] | str = DEFAULT_BLOCK,
        fc: float | None = None,
    ) -> None:
        if n_patterns < 1:
            raise PatDNNError(f"n_patterns must be at least 1, got {n_patterns}")
        if not (rho > 0 and rho_max >= rho and rho_growth >= 1):
            raise PatDNNError(f"need 0 < rho <= rho_max and rho_growth >= 1 (got {rho}, {rho_max}, {rho_growth})")
        if admm_interval < 1:
            raise PatDNNError(f"admm_interval must be at least 1, got {admm_interval}")
        self.n_patterns = n_patterns
        self.entries = entries
        self.force_centre = force_centre
        self.rho = float(rho)
        self.rho_growth = float(rho_growth)
        self.rho_max = float(rho_max)
        self.admm_interval = admm_interval
        self.default_connectivity = default_connectivity
        for what, rate in (("pointwise", pointwise), ("fc", fc)):
            if rate is not None:
                P.check_rate(rate, f"{what} rate")
        self.pointwise = pointwise
        self.pointwise_block = P.parse_block(pointwise_block)
        self.fc = fc
        self.patterns: list[int] = []
        self.phase = "unprepared"  # -> "admm" -> "masked" -> "squashed"
        self.steps = 0
        self.rounds = 0
        self._targets: list[_Target] = []
        self._optimizer_hooks: dict[int, Any] = {}

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module, config: Sequence[dict[str, Any]] | None = None) -> "PatternADMMPruner":
        """Validate the layers to prune, choose the pattern set from the current (pretrained)
        weights and initialise Z, Y to the projections of W and the duals to zero."""
        if self.phase != "unprepared":
            raise PatDNNError("this pruner is already prepared; make a new one for another model")
        if config is None:
            config = default_config(model, self.default_connectivity, self.pointwise, self.fc, self.pointwise_block)
        config = list(config)
        if not config:
            raise PatDNNError("empty pruning config: name at least one conv weight")
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        targets: list[tuple[str, nn.Parameter, float | None, tuple[int, int] | None]] = []
        for entry in config:
            unknown = set(entry) - {"tensor_fqn", "connectivity", "pointwise", "fc", "block"}
            if unknown or "tensor_fqn" not in entry:
                raise PatDNNError(f"config entry {entry!r}: needs 'tensor_fqn', optional 'connectivity' (3x3), "
                                  "'pointwise' (1x1), 'fc' (Linear), 'block', nothing else")
            fqn = entry["tensor_fqn"]
            if fqn not in params:
                raise PatDNNError(f"config names tensor {fqn!r}, which is not a parameter of the model")
            owner_name, _, leaf = fqn.rpartition(".")
            owner = modules.get(owner_name)
            if not isinstance(owner, (nn.Conv2d, nn.Linear)) or leaf != "weight":
                raise PatDNNError(f"{fqn!r} is not the weight of an nn.Conv2d or nn.Linear")
            shape = tuple(owner.weight.shape)
            kind = "fc" if isinstance(owner, nn.Linear) else "pointwise" if _pointwise_conv(owner) else "connectivity"
            wrong = [k for k in ("connectivity", "pointwise", "fc", "block") if k in entry and k != kind
                     and not (k == "block" and kind != "connectivity")]
            if wrong:
                layer = {"fc": "a Linear", "pointwise": "a 1x1 conv", "connectivity": "a 3x3 conv"}[kind]
                raise PatDNNError(f"{fqn!r} is {layer} layer: {wrong[0]!r} does not apply (use {kind!r})")
            block = None
            if kind == "connectivity":
                reason = P.prunable_reason(shape, groups=owner.groups, dilations=tuple(owner.dilation),
                                           first_layer_dense=False)
                if reason is not None:
                    raise PatDNNError(f"{fqn!r} cannot be pattern-pruned: {reason}")
                rate = entry.get("connectivity", self.default_connectivity)
            else:
                if kind == "pointwise":
                    reason = P.pointwise_reason(shape, owner.groups, first_layer_dense=False)
                    if reason is not None:
                        raise PatDNNError(f"{fqn!r} cannot be pruned: {reason}")
                rate = entry.get(kind, self.pointwise if kind == "pointwise" else self.fc)
                if rate is None:
                    raise PatDNNError(f"{fqn!r}: no {kind} rate (give one in the entry or to the pruner)")
                block = P.parse_block(entry.get("block", self.pointwise_block))
            if rate is not None:
                try:
                    rate = P.check_rate(rate, "connectivity rate" if block is None else f"{kind} rate")
                    if block is None:
                        P.kept_kernel_count(shape[0] * shape[1], rate)  # raises when no kernel would be left
                    else:
                        P.kept_block_count(math.prod(P.block_grid(shape, block)), rate)
                except PatDNNError as exc:
                    raise PatDNNError(f"{fqn!r}: {exc}") from exc
            if any(t[0] == fqn for t in targets):
                raise PatDNNError(f"{fqn!r} appears twice in the config")
            targets.append((fqn, params[fqn], rate, block))
        pattern_weights = [p.detach().cpu().numpy() for _, p, _, block in targets if block is None]
        self.patterns = [int(p) for p in P.select_pattern_set(
            pattern_weights, n_patterns=self.n_patterns, entries=self.entries,
            force_centre=self.force_centre)] if pattern_weights else []
        for fqn, param, rate, block in targets:
            w = param.detach()
            if block is None:
                z = self._project_pattern(w)
                y = None if rate is None else self._project_connectivity(w, rate)
            else:
                z, y = self._project_pointwise(w, rate, block), None
            self._targets.append(_Target(
                fqn=fqn, param=param, connectivity=rate, block=block, z=z, y=y,
                u=torch.zeros_like(w), v=None if y is None else torch.zeros_like(w)))
        self.phase = "admm"
        return self

    def _project_pattern(self, w: torch.Tensor) -> torch.Tensor:
        out = P.project_patterns(w.detach().cpu().numpy(), self.patterns)
        return torch.from_numpy(np.ascontiguousarray(out)).to(w.device, w.dtype)

    @staticmethod
    def _project_connectivity(w: torch.Tensor, rate: float) -> torch.Tensor:
        out = P.project_connectivity(w.detach().cpu().numpy(), rate)
        return torch.from_numpy(np.ascontiguousarray(out)).to(w.device, w.dtype)

    @staticmethod
    def _project_pointwise(w: torch.Tensor, rate: float, block: tuple[int, int]) -> torch.Tensor:
        out = P.project_pointwise(w.detach().cpu().numpy(), rate, block)
        return torch.from_numpy(np.ascontiguousarray(out)).to(w.device, w.dtype)

    @property
    def tensor_fqns(self) -> list[str]:
        """Names of the pruned weights, in config order."""
        return [t.fqn for t in self._targets]

    # ------------------------------------------------------------------ ADMM phase
    def admm_loss(self) -> torch.Tensor:
        """``sum rho/2 (||W - Z + U||^2 + ||W - Y + V||^2)``: add it to the training loss.

        Zero once the pruner has hard-pruned, so one training loop serves both phases.
        """
        self._require("admm_loss", "admm", "masked", "squashed")
        if self.phase != "admm":
            return torch.zeros((), device=self._targets[0].param.device)
        total = torch.zeros((), device=self._targets[0].param.device)
        for t in self._targets:
            total = total + (t.param - t.z + t.u).pow(2).sum()
            if t.y is not None:
                total = total + (t.param - t.y + t.v).pow(2).sum()
        return 0.5 * self.rho * total

    def step(self) -> bool:
        """Count one training step; run an ADMM round every ``admm_interval`` steps.

        Returns whether a round ran. A no-op after hard pruning.
        """
        self._require("step", "admm", "masked", "squashed")
        if self.phase != "admm":
            return False
        self.steps += 1
        if self.steps % self.admm_interval:
            return False
        self.admm_update()
        return True

    @torch.no_grad()
    def admm_update(self) -> None:
        """One ADMM round: Z, Y projections, dual ascent, then rho growth (duals rescaled)."""
        self._require("admm_update", "admm")
        new_rho = min(self.rho * self.rho_growth, self.rho_max)
        scale = self.rho / new_rho
        for t in self._targets:
            w = t.param.detach()
            if t.block is not None:
                t.z = self._project_pointwise(w + t.u, t.connectivity, t.block)
                t.u.add_(w - t.z).mul_(scale)
                continue
            t.z = self._project_pattern(w + t.u)
            t.u.add_(w - t.z).mul_(scale)
            if t.y is not None:
                t.y = self._project_connectivity(w + t.v, t.connectivity)
                t.v.add_(w - t.y).mul_(scale)
        self.rho = new_rho
        self.rounds += 1

    @torch.no_grad()
    def residuals(self) -> dict[str, dict[str, float]]:
        """Relative primal residuals ``||W - Z|| / ||W||`` and ``||W - Y|| / ||W||`` per layer:
        how far the weights still are from each constraint (they should fall towards 0). A
        1x1/Linear layer reports its single block constraint as ``connectivity``."""
        self._require("residuals", "admm")
        out = {}
        for t in self._targets:
            norm = float(t.param.norm()) or 1.0
            if t.block is not None:  # a 1x1/Linear layer has one constraint, its connectivity (Z)
                out[t.fqn] = {"pattern": 0.0, "connectivity": float((t.param - t.z).norm()) / norm}
                continue
            out[t.fqn] = {"pattern": float((t.param - t.z).norm()) / norm,
                          "connectivity": 0.0 if t.y is None else float((t.param - t.y).norm()) / norm}
        return out

    # ------------------------------------------------------------------ hard pruning and masks
    @torch.no_grad()
    def hard_prune(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """Project every pruned weight onto both constraints and keep it there from now on.

        Gradients of removed weights are masked, and (when ``optimizer`` is given, or later
        through :meth:`attach`) the weights are re-zeroed after every optimizer step, because
        momentum and weight decay would otherwise revive them. Returns the boolean masks.
        """
        self._require("hard_prune", "admm")
        for t in self._targets:
            w = t.param.detach().cpu().numpy()
            if t.block is not None:
                self._install_mask(t, torch.from_numpy(P.pointwise_mask(w, t.connectivity, t.block)))
                continue
            o, i, kh, kw = w.shape
            taps = _pattern_taps(np.asarray(P.assign_patterns(w, self.patterns), dtype=np.int64), kh)
            if t.connectivity is None:
                kept = np.ones((o, i), dtype=bool)
            else:
                projected = P.project_pattern_and_connectivity(w, self.patterns, t.connectivity)
                kept = kernel_masks(projected) != 0
                expected = P.kept_kernel_count(o * i, t.connectivity)
                if int(kept.sum()) != expected:
                    raise PatDNNError(
                        f"{t.fqn}: projection kept {int(kept.sum())} kernels instead of {expected}; "
                        "the layer has kernels whose pattern taps are all exactly zero")
            self._install_mask(t, torch.from_numpy(taps & kept[:, :, None, None]))
        self.phase = "masked"
        if optimizer is not None:
            self.attach(optimizer)
        return self.masks()

    @torch.no_grad()
    def _install_mask(self, t: _Target, mask: torch.Tensor) -> None:
        """Zero the removed weights, mask their gradient and drop the ADMM state."""
        mask = mask.to(t.param.device)
        t.mask = mask
        t.param.masked_fill_(~mask, 0.0)
        t.hook = t.param.register_hook(lambda grad, m=mask: grad.masked_fill(~m, 0.0))
        t.z = t.y = t.u = t.v = None  # type: ignore[assignment]  # ADMM state no longer needed

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-zero pruned weights after every step of ``optimizer`` and clear their momentum."""
        self._require("attach", "masked")
        if id(optimizer) in self._optimizer_hooks:
            return
        self._clear_optimizer_state(optimizer)
        self._optimizer_hooks[id(optimizer)] = optimizer.register_step_post_hook(lambda *_: self.apply_masks())

    @torch.no_grad()
    def _clear_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        for t in self._targets:
            for value in optimizer.state.get(t.param, {}).values():
                if torch.is_tensor(value) and value.shape == t.param.shape:
                    value.masked_fill_(~t.mask, 0.0)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every removed weight back to exactly +0.0."""
        for t in self._targets:
            if t.mask is not None:
                t.param.masked_fill_(~t.mask, 0.0)

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks by tensor name (empty before hard pruning)."""
        return {t.fqn: t.mask for t in self._targets if t.mask is not None}

    def squash_mask(self) -> None:
        """Make pruning permanent: zeros stay in the weights, the gradient and optimizer hooks
        are removed (the masks stay readable through :meth:`masks`)."""
        self._require("squash_mask", "masked")
        self.apply_masks()
        for t in self._targets:
            t.hook.remove()
            t.hook = None
        for handle in self._optimizer_hooks.values():
            handle.remove()
        self._optimizer_hooks.clear()
        self.phase = "squashed"

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def report(self) -> list[dict[str, Any]]:
        """Per pruned layer: kind, nonzeros, compression and the constraint's own counts.

        3x3 rows (``kind`` "pattern") give kept/expected kernels and whether every kernel lies
        within one selected pattern (what the compiler will rely on); 1x1/Linear rows
        (``kind`` "pointwise"/"fc") give the block, kept/expected blocks and the kept fraction.
        """
        rows = []
        allowed = np.asarray(self.patterns, dtype=np.int64)
        for t in self._targets:
            w = t.param.detach().cpu().numpy()
            o, i = w.shape[:2]
            row: dict[str, Any] = {
                "tensor_fqn": t.fqn,
                "kind": "pattern" if t.block is None else "fc" if w.ndim == 2 else "pointwise",
                "shape": list(w.shape),
                "connectivity": t.connectivity,
                "weights": int(w.size),
                "nonzeros": int(np.count_nonzero(w)),
                "compression": float(w.size / max(np.count_nonzero(w), 1)),
            }
            if t.block is None:
                km = kernel_masks(w)
                live = km != 0
                within = (km[..., None] & ~allowed) == 0
                row.update({
                    "kernels": int(o * i),
                    "kept_kernels": int(live.sum()),
                    "expected_kernels": int(o * i if t.connectivity is None else P.kept_kernel_count(o * i, t.connectivity)),
                    "within_patterns": bool(within.any(-1)[live].all()),
                })
            else:
                bo, bi = t.block
                grid = P.block_grid(w.shape, t.block)
                padded = np.zeros((grid[0] * bo, grid[1] * bi), dtype=bool)
                padded[:o, :i] = w.reshape(o, i) != 0
                row.update({
                    "block": list(t.block),
                    "blocks": int(math.prod(grid)),
                    "kept_blocks": int(padded.reshape(grid[0], bo, grid[1], bi).any(axis=(1, 3)).sum()),
                    "expected_blocks": P.kept_block_count(math.prod(grid), t.connectivity),
                    "kept_fraction": float(np.count_nonzero(w)) / w.size,
                })
            rows.append(row)
        return rows

    def verify(self) -> None:
        """Raise :class:`PatDNNError` unless every constraint holds exactly (after hard pruning)."""
        self._require("verify", "masked", "squashed")
        for row in self.report():
            if row["kind"] != "pattern":
                if row["kept_blocks"] > row["expected_blocks"]:
                    raise PatDNNError(f"{row['tensor_fqn']}: {row['kept_blocks']} nonzero blocks, "
                                      f"the rate allows {row['expected_blocks']}")
                continue
            if not row["within_patterns"]:
                raise PatDNNError(f"{row['tensor_fqn']}: a kernel has taps outside the selected patterns")
            if row["kept_kernels"] > row["expected_kernels"]:
                raise PatDNNError(f"{row['tensor_fqn']}: {row['kept_kernels']} nonzero kernels, "
                                  f"connectivity allows {row['expected_kernels']}")
        for t in self._targets:
            if t.mask is not None and bool((t.param.detach()[~t.mask] != 0).any()):
                raise PatDNNError(f"{t.fqn}: a pruned weight is no longer zero")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: hyperparameters, patterns, rho, counters, ADMM tensors, masks."""
        self._require("state_dict", "admm", "masked", "squashed")

        def clone(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach().clone()

        return {
            "hyper": {"n_patterns": self.n_patterns, "entries": self.entries, "force_centre": self.force_centre,
                      "rho_growth": self.rho_growth, "rho_max": self.rho_max, "admm_interval": self.admm_interval,
                      "pointwise": self.pointwise, "pointwise_block": self.pointwise_block, "fc": self.fc},
            "patterns": list(self.patterns),
            "phase": self.phase,
            "rho": self.rho,
            "steps": self.steps,
            "rounds": self.rounds,
            "targets": [{"tensor_fqn": t.fqn, "connectivity": t.connectivity, "block": t.block, "z": clone(t.z), "y": clone(t.y),
                         "u": clone(t.u), "v": clone(t.v), "mask": clone(t.mask)} for t in self._targets],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a pruner prepared on the same model layout
        (load the model weights first; masks and gradient hooks are reinstalled)."""
        self._require("load_state_dict", "admm")
        names = [t["tensor_fqn"] for t in state["targets"]]
        if names != self.tensor_fqns:
            raise PatDNNError(f"checkpoint prunes {names}, this pruner was prepared for {self.tensor_fqns}")
        for key, value in state["hyper"].items():
            setattr(self, key, value)
        self.patterns = [int(p) for p in state["patterns"]]
        self.rho, self.steps, self.rounds = float(state["rho"]), int(state["steps"]), int(state["rounds"])
        for t, saved in zip(self._targets, state["targets"]):
            t.connectivity = saved["connectivity"]
            if (None if saved.get("block") is None else tuple(saved["block"])) != t.block:
                raise PatDNNError(f"{t.fqn}: checkpoint block {saved.get('block')} differs from this pruner's {t.block}")
            t.z, t.y, t.u, t.v = (None if saved[k] is None else saved[k].to(t.param.device).clone()
                                  for k in ("z", "y", "u", "v"))
            t.mask = None if saved["mask"] is None else saved["mask"].to(t.param.device).clone()
        if state["phase"] in ("masked", "squashed"):
            with torch.no_grad():
                self.phase = "masked"
                for t in self._targets:
                    t.hook = t.param.register_hook(lambda grad, m=t.mask: grad.masked_fill(~m, 0.0))
                if state["phase"] == "squashed":
                    self.squash_mask()
        else:
            self.phase = state["phase"]

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


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    pruner: PatternADMMPruner | None = None,
    epoch: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save model, optimizer and pruner state with the epoch reached, atomically: an
    interrupted run leaves the previous checkpoint intact, never a truncated one."""
    buffer = io.BytesIO()
    torch.save({
        "model": model.state_dict(),
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
    pruner: PatternADMMPruner | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns ``{"epoch": ..., "extra": ...}``.

    The pruner must be prepared on ``model`` (same config); if it was in the masked phase the
    optimizer is re-attached so pruned weights keep being re-zeroed.
    """
    path = Path(path)
    if not path.is_file():
        raise PatDNNError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or foreign file: torch raises many types
        raise PatDNNError(f"cannot read checkpoint {path}: {exc}") from exc
    model.load_state_dict(state["model"])
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


# ---------------------------------------------------------------------- ONNX export
def export_pruned_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    check_fqns: Sequence[str] | None = None,
) -> "Any":
    """Export ``model`` (eval mode) to ONNX and verify that pruned weights stayed exactly 0.0.

    Exported by ``torch_frontend.export_onnx`` (TorchScript exporter, eval mode, dynamic batch),
    which folds BatchNorm into the preceding conv: that rescales each filter but cannot create
    nonzeros, so each pruned conv weight (``check_fqns``: default, every conv weight with a
    zero) must reappear as an initializer with exactly the same zero positions. The file is
    written atomically. Returns the ``onnx.ModelProto``.
    """
    import onnx.numpy_helper

    from ..torch_frontend import export_onnx

    params = dict(model.named_parameters())
    if check_fqns is None:
        check_fqns = [_fqn(n) for n, m in model.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear)) and bool((m.weight == 0).any())]
    unknown = [f for f in check_fqns if f not in params]
    if unknown:
        raise PatDNNError(f"check_fqns names tensors the model does not have: {unknown}")
    proto = export_onnx(model, (example_input,), opset=opset, dynamic_batch=True)
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    used: set[str] = set()
    for fqn in check_fqns:
        zeros = (params[fqn].detach().cpu().numpy() == 0)
        candidates = [fqn] if fqn in initializers else [n for n, a in initializers.items() if a.shape == zeros.shape and n not in used]
        match = next((n for n in candidates if np.array_equal(initializers[n] == 0, zeros)), None)
        if match is None:
            raise PatDNNError(f"ONNX export of {fqn}: no initializer keeps its zeros exactly (sparsity lost in export)")
        if np.signbit(initializers[match][zeros]).any():
            raise PatDNNError(f"ONNX export of {fqn}: pruned weights are -0.0, not +0.0")
        used.add(match)
    save_model_atomic(proto, Path(path))
    return proto


# ---------------------------------------------------------------------- training helpers
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
