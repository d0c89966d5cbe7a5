"""PatDNN's masks as a ``torch.ao.pruning`` sparsifier: one pattern per kernel and a kept-kernel
count on 3x3 convs, kept blocks on 1x1 convs and Linear layers.

``prepare`` puts a :class:`FakeSparsity` parametrization (an all-ones mask) on every pruned
weight; ``step`` (``update_mask`` per weight) projects the weights onto both constraints with
the numpy projections of :mod:`.projection` and writes the result into the masks; ``squash_mask``
makes the zeros permanent. Because the parametrization multiplies the weight by its mask in the
forward pass, the gradient is masked too, and removed weights stay exactly zero through masked
retraining whatever momentum or weight decay do: no gradient or optimizer hooks.

:class:`~.admm.PatternADMMPruner` drives it after the ADMM phase; on its own it is the one-shot
(magnitude) pruner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier

from ..errors import PatDNNError
from ..kernel_patterns import kernel_masks
from . import projection as P

__all__ = ["PatternSparsifier", "default_config", "DEFAULT_CONNECTIVITY", "DEFAULT_POINTWISE", "DEFAULT_BLOCK"]

#: PatDNN's connectivity rate for the 8x setting (9/4 from 4-entry patterns x 3.6 = 8.1x).
DEFAULT_CONNECTIVITY = 3.6
#: Rate and granularity of 1x1 convs: keep 1/4 of the weights in blocks of 4 output channels.
DEFAULT_POINTWISE = 4.0
DEFAULT_BLOCK = (4, 1)


def weight_fqn(module_name: str) -> str:
    """The name of a module's weight as ``tensor_fqn`` (the root module's is plain ``weight``)."""
    return f"{module_name}.weight" if module_name else "weight"


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
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for index, (name, conv) in enumerate(convs):
        if index == 0:
            continue
        shape = tuple(conv.weight.shape)
        if _pointwise_conv(conv):
            if pointwise is not None and P.pointwise_reason(shape, conv.groups, first_layer_dense=False) is None \
                    and shape[0] >= block[0] and shape[1] >= block[1]:
                config.append({"tensor_fqn": weight_fqn(name), "pointwise": pointwise, "block": block})
        elif P.prunable_reason(shape, groups=conv.groups, dilations=tuple(conv.dilation), first_layer_dense=False) is None:
            config.append({"tensor_fqn": weight_fqn(name), "connectivity": connectivity})
    if fc is not None:
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in linears[:-1]:
            if linear.out_features >= block[0] and linear.in_features >= block[1]:
                config.append({"tensor_fqn": weight_fqn(name), "fc": fc, "block": block})
    if not config:
        raise PatDNNError("the model has no prunable 3x3 (or, when asked, 1x1/Linear) layer besides the first one")
    return config


class PatternSparsifier(BaseSparsifier):
    """Pattern + connectivity masks (3x3 convs) and block masks (1x1 convs, Linear layers).

    Args:
        n_patterns: size of the model-wide pattern set (PatDNN uses 6–8).
        entries: taps kept per kernel (4 for 3x3 kernels in PatDNN).
        force_centre: always keep the centre tap, as PatDNN's pattern library does.
        connectivity: rate of 3x3 config entries that do not give one (``None``: patterns only).
        pointwise: keep rate of 1x1 convs (``None``: leave them dense) in the default config
            and for ``"pointwise"`` entries that give no rate.
        block: granularity of 1x1/Linear pruning, output x input channels kept or removed
            together (:func:`projection.pointwise_mask`); entries may override it.
        fc: keep rate of Linear layers (all but the last) in the default config; ``None``: dense.

    Each group holds ``tensor_fqn``, ``connectivity`` (the 3x3 kernel rate, or the block keep
    rate of a 1x1/Linear layer) and ``block`` (``None`` for a 3x3 pattern layer).
    """

    def __init__(
        self,
        n_patterns: int = 8,
        entries: int = 4,
        *,
        force_centre: bool = True,
        connectivity: float | None = DEFAULT_CONNECTIVITY,
        pointwise: float | None = DEFAULT_POINTWISE,
        block: Sequence[int] | str = DEFAULT_BLOCK,
        fc: float | None = None,
    ) -> None:
        if n_patterns < 1:
            raise PatDNNError(f"n_patterns must be at least 1, got {n_patterns}")
        for what, rate in (("pointwise", pointwise), ("fc", fc)):
            if rate is not None:
                P.check_rate(rate, f"{what} rate")
        super().__init__()
        self.n_patterns = n_patterns
        self.entries = entries
        self.force_centre = force_centre
        self.connectivity = connectivity
        self.pointwise = pointwise
        self.block = P.parse_block(block)
        self.fc = fc
        self.patterns: list[int] = []

    def prepare(self, model: nn.Module, config: Sequence[dict[str, Any]] | None = None) -> "PatternSparsifier":
        """Check the layers to prune, choose the pattern set from the current (pretrained)
        weights, then put an all-ones mask on every pruned weight (``BaseSparsifier.prepare``)."""
        if self.groups:
            raise PatDNNError("this sparsifier is already prepared; make a new one for another model")
        if config is None:
            config = default_config(model, self.connectivity, self.pointwise, self.fc, self.block)
        config = list(config)
        if not config:
            raise PatDNNError("empty pruning config: name at least one conv weight")
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        groups: list[dict[str, Any]] = []
        for entry in config:
            group = self._group(entry, params, modules)
            if any(g["tensor_fqn"] == group["tensor_fqn"] for g in groups):
                raise PatDNNError(f"{group['tensor_fqn']!r} appears twice in the config")
            groups.append(group)
        pattern_weights = [params[g["tensor_fqn"]].detach().cpu().numpy() for g in groups if g["block"] is None]
        self.patterns = [int(p) for p in P.select_pattern_set(
            pattern_weights, n_patterns=self.n_patterns, entries=self.entries,
            force_centre=self.force_centre)] if pattern_weights else []
        super().prepare(model, groups)
        return self

    def _group(self, entry: dict[str, Any], params: dict[str, nn.Parameter], modules: dict[str, nn.Module]) -> dict[str, Any]:
        """One config entry checked against its layer, with the rate and block it gets."""
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
            reason = P.prunable_reason(shape, groups=owner.groups, dilations=tuple(owner.dilation), first_layer_dense=False)
            if reason is not None:
                raise PatDNNError(f"{fqn!r} cannot be pattern-pruned: {reason}")
            rate = entry.get("connectivity", self.connectivity)
        else:
            if kind == "pointwise":
                reason = P.pointwise_reason(shape, owner.groups, first_layer_dense=False)
                if reason is not None:
                    raise PatDNNError(f"{fqn!r} cannot be pruned: {reason}")
            rate = entry.get(kind, self.pointwise if kind == "pointwise" else self.fc)
            if rate is None:
                raise PatDNNError(f"{fqn!r}: no {kind} rate (give one in the entry or to the pruner)")
            block = P.parse_block(entry.get("block", self.block))
        if rate is not None:
            try:
                rate = P.check_rate(rate, "connectivity rate" if block is None else f"{kind} rate")
                if block is None:
                    P.kept_kernel_count(shape[0] * shape[1], rate)  # raises when no kernel would be left
                else:
                    P.kept_block_count(math.prod(P.block_grid(shape, block)), rate)
            except PatDNNError as exc:
                raise PatDNNError(f"{fqn!r}: {exc}") from exc
        return {"tensor_fqn": fqn, "connectivity": rate, "block": block}

    @property
    def tensor_fqns(self) -> list[str]:
        """Names of the pruned weights, in config order."""
        return [g["tensor_fqn"] for g in self.groups]

    @staticmethod
    def parameter(group: dict[str, Any]) -> nn.Parameter:
        """The trained parameter behind a pruned weight: the parametrization's ``original``
        while the mask is on, the module's own weight after ``squash_mask``."""
        module, name = group["module"], group["tensor_name"]
        if nn.utils.parametrize.is_parametrized(module, name):
            return module.parametrizations[name].original
        return getattr(module, name)

    def update_mask(self, module: nn.Module, tensor_name: str, *, tensor_fqn: str, connectivity: float | None,
                    block: tuple[int, int] | None, **kwargs: Any) -> None:
        """Project the weight onto both constraints: the mask keeps each kernel's best pattern
        within the kept kernels (3x3), or the kept blocks (1x1/Linear). The removed weights are
        also zeroed in the stored weight, so it equals what the model computes with."""
        w = getattr(module, tensor_name).detach().cpu().numpy()
        if block is not None:
            keep = P.pointwise_mask(w, connectivity, block)
        else:
            o, i = w.shape[:2]
            taps = P.pattern_taps(P.assign_patterns(w, self.patterns), w.shape[2])
            if connectivity is None:
                kept = np.ones((o, i), dtype=bool)
            else:
                kept = kernel_masks(P.project_pattern_and_connectivity(w, self.patterns, connectivity)) != 0
                expected = P.kept_kernel_count(o * i, connectivity)
                if int(kept.sum()) != expected:
                    raise PatDNNError(
                        f"{tensor_fqn}: projection kept {int(kept.sum())} kernels instead of {expected}; "
                        "the layer has kernels whose pattern taps are all exactly zero")
            keep = taps & kept[:, :, None, None]
        mask = self.state[tensor_fqn]["mask"]  # the parametrization's own buffer: update it in place
        mask.copy_(torch.from_numpy(keep))
        module.parametrizations[tensor_name].original.masked_fill_(mask == 0, 0.0)

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks by tensor name (all ones before the first ``step``)."""
        return {g["tensor_fqn"]: self.state[g["tensor_fqn"]]["mask"] != 0 for g in self.groups}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every removed weight of the stored weights back to exactly +0.0."""
        for group in self.groups:
            self.parameter(group).masked_fill_(self.state[group["tensor_fqn"]]["mask"] == 0, 0.0)

    @torch.no_grad()
    def clear_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the removed weights' momentum (and any other per-weight state) in ``optimizer``.

        The masks already keep those weights out of the model; this keeps the stored weights
        at +0.0 as well (a zero gradient and zero state leave a zero weight where it is under
        SGD and Adam), so checkpoints hold the pruned values and ``squash_mask`` has nothing
        to correct.
        """
        for group in self.groups:
            param, mask = self.parameter(group), self.state[group["tensor_fqn"]]["mask"]
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(mask == 0, 0.0)

    def squash_mask(self, *args: Any, **kwargs: Any) -> None:
        """``BaseSparsifier.squash_mask`` after zeroing the removed stored weights: the mask
        multiplies them away, but a stored negative value would come out as -0.0, and a
        pruned weight must be +0.0 (a sign bit is not sparsity to every consumer)."""
        self.apply_masks()
        super().squash_mask(*args, **kwargs)

    @torch.no_grad()
    def report(self) -> list[dict[str, Any]]:
        """Per pruned layer: kind, nonzeros, compression and the constraint's own counts.

        3x3 rows (``kind`` "pattern") give kept/expected kernels and whether every kernel lies
        within one selected pattern (what the compiler will rely on); 1x1/Linear rows
        (``kind`` "pointwise"/"fc") give the block, kept/expected blocks and the kept fraction.
        """
        rows = []
        allowed = np.asarray(self.patterns, dtype=np.int64)
        for group in self.groups:
            w = getattr(group["module"], group["tensor_name"]).detach().cpu().numpy()
            rate, block = group["connectivity"], group["block"]
            o, i = w.shape[:2]
            row: dict[str, Any] = {
                "tensor_fqn": group["tensor_fqn"],
                "kind": "pattern" if block is None else "fc" if w.ndim == 2 else "pointwise",
                "shape": list(w.shape),
                "connectivity": rate,
                "weights": int(w.size),
                "nonzeros": int(np.count_nonzero(w)),
                "compression": float(w.size / max(np.count_nonzero(w), 1)),
            }
            if block is None:
                km = kernel_masks(w)
                live = km != 0
                within = (km[..., None] & ~allowed) == 0
                row.update({
                    "kernels": int(o * i),
                    "kept_kernels": int(live.sum()),
                    "expected_kernels": int(o * i if rate is None else P.kept_kernel_count(o * i, rate)),
                    "within_patterns": bool(within.any(-1)[live].all()),
                })
            else:
                bo, bi = block
                grid = P.block_grid(w.shape, block)
                padded = np.zeros((grid[0] * bo, grid[1] * bi), dtype=bool)
                padded[:o, :i] = w.reshape(o, i) != 0
                row.update({
                    "block": list(block),
                    "blocks": int(math.prod(grid)),
                    "kept_blocks": int(padded.reshape(grid[0], bo, grid[1], bi).any(axis=(1, 3)).sum()),
                    "expected_blocks": P.kept_block_count(math.prod(grid), rate),
                    "kept_fraction": float(np.count_nonzero(w)) / w.size,
                })
            rows.append(row)
        return rows

    @torch.no_grad()
    def verify(self) -> None:
        """Raise :class:`PatDNNError` unless every constraint holds exactly (after ``step``)."""
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
        for group in self.groups:
            weight = getattr(group["module"], group["tensor_name"])
            if bool((weight[self.state[group["tensor_fqn"]]["mask"] == 0] != 0).any()):
                raise PatDNNError(f"{group['tensor_fqn']}: a pruned weight is no longer zero")
