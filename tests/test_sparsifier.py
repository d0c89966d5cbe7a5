"""The pruner's torch.ao-shaped pieces on their own: the masks are FakeSparsity parametrizations of
a BaseSparsifier, an optimizer step cannot revive a removed weight, the rho schedule and the ADMM
penalty are separate objects, checkpoints load into models with or without masks.

Small random models, one thread, a few seconds. Skips only without torch.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the pruner needs torch (pip install tvm-patdnn[train])")
from torch import nn  # noqa: E402
from torch.ao.pruning import BaseSparsifier  # noqa: E402
from torch.ao.pruning.sparsifier.utils import FakeSparsity  # noqa: E402

from tvm_patdnn.errors import PatDNNError  # noqa: E402
from tvm_patdnn.kernel_patterns import kernel_masks  # noqa: E402
from tvm_patdnn.pruning.admm import PatternADMMPruner  # noqa: E402
from tvm_patdnn.pruning.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from tvm_patdnn.pruning.onnx_export import export_pruned_onnx  # noqa: E402
from tvm_patdnn.pruning.penalty import ADMMPenalty, RhoSchedule  # noqa: E402
from tvm_patdnn.pruning.projection import kept_kernel_count, project_patterns  # noqa: E402
from tvm_patdnn.pruning.sparsifier import PatternSparsifier  # noqa: E402

torch.set_num_threads(1)


def small_cnn(seed: int = 0) -> nn.Module:
    """A dense stem, a 3x3 conv with BatchNorm, a 1x1 conv and two Linears."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def step_once(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_the_masks_are_fake_sparsity_parametrizations_of_a_base_sparsifier():
    model = small_cnn()
    sparsifier = PatternSparsifier(pointwise=2.0, fc=2.0).prepare(model)
    assert isinstance(sparsifier, BaseSparsifier)
    assert sparsifier.tensor_fqns == ["2.weight", "5.weight", "8.weight"]  # the stem and the classifier stay dense
    for fqn in sparsifier.tensor_fqns:
        module = model.get_submodule(fqn.rpartition(".")[0])
        (mask,) = module.parametrizations.weight
        assert isinstance(mask, FakeSparsity) and bool((mask.mask == 1).all())  # all ones until step()
        assert mask.mask is sparsifier.state[fqn]["mask"]
    sparsifier.step()  # update_mask: project onto the constraints
    conv = model.get_submodule("2")
    assert int(kernel_masks(conv.weight.detach().numpy()).astype(bool).sum()) == kept_kernel_count(128, 3.6)
    assert torch.equal(conv.weight, conv.parametrizations.weight.original * sparsifier.masks()["2.weight"])
    sparsifier.verify()
    sparsifier.squash_mask()
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert isinstance(conv.weight, nn.Parameter)
    sparsifier.verify()


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda params: torch.optim.Adam(params, lr=0.01),
], ids=["sgd", "adam"])
def test_an_optimizer_step_keeps_removed_weights_exactly_zero(make_optimizer):
    model = small_cnn()
    optimizer = make_optimizer(model.parameters())
    sparsifier = PatternSparsifier(pointwise=2.0, fc=2.0).prepare(model)
    for seed in range(3):  # momentum for every weight, the removed ones too
        step_once(model, optimizer, seed)
    sparsifier.step()
    originals = {fqn: model.get_submodule(fqn.rpartition(".")[0]).parametrizations.weight.original
                 for fqn in sparsifier.tensor_fqns}
    kept = {fqn: original.detach().clone() for fqn, original in originals.items()}
    step_once(model, optimizer, 3)  # old momentum still pulls at the removed weights
    for fqn, keep in sparsifier.masks().items():
        weight = model.get_submodule(fqn.rpartition(".")[0]).weight.detach()
        assert bool((weight[~keep] == 0).all()), fqn  # the mask keeps them out of the model
        assert not torch.equal(originals[fqn][keep], kept[fqn][keep]), fqn  # while the rest trains
    sparsifier.clear_optimizer_state(optimizer)
    sparsifier.apply_masks()
    for seed in range(4, 6):
        step_once(model, optimizer, seed)
    for fqn, keep in sparsifier.masks().items():  # no momentum left: the stored weights stay +0.0 too
        removed = originals[fqn].detach()[~keep]
        assert bool((removed == 0).all()) and not bool(torch.signbit(removed).any()), fqn
    sparsifier.squash_mask()
    sparsifier.verify()


def test_squash_mask_leaves_positive_zeros_even_when_the_stored_weights_drifted():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = PatternSparsifier(pointwise=None).prepare(model)
    step_once(model, optimizer)
    sparsifier.step()
    step_once(model, optimizer, 1)  # momentum never cleared: removed stored weights move off zero
    original = model.get_submodule("2").parametrizations.weight.original.detach()
    assert bool((original[~sparsifier.masks()["2.weight"]] != 0).any())
    sparsifier.squash_mask()
    removed = model.get_submodule("2").weight.detach()[~sparsifier.masks()["2.weight"]]
    assert bool((removed == 0).all()) and not bool(torch.signbit(removed).any())


def test_rho_schedule_grows_to_its_cap_and_returns_the_dual_rescaling():
    schedule = RhoSchedule(rho=0.1, growth=4.0, rho_max=1.0)
    assert [schedule.step() for _ in range(3)] == pytest.approx([0.25, 0.4, 1.0])
    assert schedule.rho == 1.0
    with pytest.raises(PatDNNError, match="rho_growth >= 1"):
        RhoSchedule(growth=0.5)
    with pytest.raises(PatDNNError, match="rho <= rho_max"):
        RhoSchedule(rho=2.0, rho_max=1.0)


def test_the_penalty_is_a_separate_object_on_the_sparsifier_weights():
    model = small_cnn()
    sparsifier = PatternSparsifier(pointwise=None).prepare(model)
    penalty = ADMMPenalty(sparsifier, RhoSchedule(rho=0.5, growth=2.0, rho_max=1.0), interval=2)
    split = penalty.variables["2.weight"]
    assert split.weight is model.get_submodule("2").parametrizations.weight.original
    w = split.weight.detach().numpy()
    assert np.array_equal(split.z.numpy(), project_patterns(w, sparsifier.patterns))
    with torch.no_grad():
        assert float(penalty.loss()) == pytest.approx(0.5 / 2 * float(((split.weight - split.z) ** 2).sum()
                                                                      + ((split.weight - split.y) ** 2).sum()))
    assert [penalty.step() for _ in range(4)] == [False, True, False, True]
    assert penalty.rounds == 2 and penalty.rho == 1.0  # 0.5 -> 1.0 (capped)
    assert set(penalty.residuals()["2.weight"]) == {"pattern", "connectivity"}
    with pytest.raises(PatDNNError, match="prepared sparsifier"):
        ADMMPenalty(PatternSparsifier())
    with pytest.raises(PatDNNError, match="admm_interval"):
        ADMMPenalty(sparsifier, interval=0)


def test_a_masked_checkpoint_loads_into_a_bare_model_and_back(tmp_path):
    """Checkpoints keep plain weight names: a masked model's checkpoint loads into an unprepared
    model (to evaluate it) and into a prepared one (to resume), with the same outputs."""
    model = small_cnn()
    pruner = PatternADMMPruner(pointwise=None).prepare(model)
    pruner.hard_prune()
    save_checkpoint(tmp_path / "masked.pt", model=model, pruner=pruner)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    bare = small_cnn(seed=1)
    load_checkpoint(tmp_path / "masked.pt", model=bare)
    resumed = small_cnn(seed=2)
    load_checkpoint(tmp_path / "masked.pt", model=resumed, pruner=PatternADMMPruner(pointwise=None).prepare(resumed))
    with torch.no_grad():
        assert torch.equal(bare.eval()(x), expected) and torch.equal(resumed.eval()(x), expected)
    with pytest.raises(PatDNNError, match="does not fit the model"):
        load_checkpoint(tmp_path / "masked.pt", model=nn.Sequential(nn.Conv2d(1, 8, 3)))


def test_export_checks_the_zeros_while_the_masks_are_still_on(tmp_path):
    model = small_cnn()
    pruner = PatternADMMPruner(pointwise=2.0, fc=2.0).prepare(model)
    pruner.hard_prune()
    proto = export_pruned_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "masked.onnx")
    assert (tmp_path / "masked.onnx").is_file() and len(proto.graph.initializer) > 0


def test_a_squashed_checkpoint_resumes_into_a_freshly_prepared_pruner(tmp_path):
    model = small_cnn()
    pruner = PatternADMMPruner(pointwise=2.0, fc=2.0).prepare(model)
    pruner.hard_prune()
    pruner.squash_mask()
    save_checkpoint(tmp_path / "squashed.pt", model=model, pruner=pruner)
    fresh = small_cnn(seed=3)
    fresh_pruner = PatternADMMPruner(pointwise=2.0, fc=2.0).prepare(fresh)
    load_checkpoint(tmp_path / "squashed.pt", model=fresh, pruner=fresh_pruner)
    assert fresh_pruner.phase == "squashed"
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in fresh.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh.state_dict().keys() == model.state_dict().keys()
    fresh_pruner.verify()
