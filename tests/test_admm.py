"""ADMM pattern/connectivity pruning on real data (Fashion-MNIST slice), checkpoints, ONNX export.

Everything runs on one thread in well under a minute. Skips only when torch or the data
packages are missing.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the ADMM pruner needs torch (pip install tvm-patdnn[train])")
from torch import nn  # noqa: E402

from tvm_patdnn.errors import PatDNNError  # noqa: E402
from tvm_patdnn.kernel_patterns import kernel_masks  # noqa: E402
from benchmarks.accuracy.training import evaluate, train_epoch  # noqa: E402
from tvm_patdnn.pruning.admm import (  # noqa: E402
    PatternADMMPruner,
    default_config,
    export_pruned_onnx,
    load_checkpoint,
    magnitude_prune,
    save_checkpoint,
)
from tvm_patdnn.pruning.projection import kept_kernel_count  # noqa: E402

torch.set_num_threads(1)

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


@pytest.fixture(scope="module")
def fashion() -> dict[str, torch.Tensor]:
    """2000 training and 1000 test images of the real Fashion-MNIST."""
    from tvm_patdnn.datasets import load_fashion_mnist

    try:
        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
    except PatDNNError as exc:
        pytest.skip(f"Fashion-MNIST data package missing: {exc}")
    norm = lambda x: (torch.from_numpy(x) - FASHION_MEAN) / FASHION_STD  # noqa: E731
    return {"xtr": norm(xtr[:2000]), "ytr": torch.from_numpy(ytr[:2000]),
            "xte": norm(xte[:1000]), "yte": torch.from_numpy(yte[:1000])}


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Three 3x3 convs (the last two prunable) with a BatchNorm, so BN folding is exercised."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


@pytest.fixture(scope="module")
def dense(fashion: dict[str, torch.Tensor]) -> nn.Module:
    model = tiny_cnn()
    optimizer = sgd(model)
    for _ in range(2):
        train_epoch(model, fashion["xtr"], fashion["ytr"], optimizer, batch_size=64,
                    generator=torch.Generator().manual_seed(0), progress=False)
    return model


def copy_of(model: nn.Module) -> nn.Module:
    clone = tiny_cnn()
    clone.load_state_dict(model.state_dict())
    return clone


def weight_of(model: nn.Module, fqn: str) -> np.ndarray:
    """The weight the model computes with: masked while the pruner's mask is on (a parametrization,
    so not ``get_parameter``), the plain parameter after ``squash_mask``."""
    return model.get_submodule(fqn.rpartition(".")[0]).weight.detach().numpy()


def assert_constraints(model: nn.Module, pruner: PatternADMMPruner, rate: float) -> None:
    """Every kernel inside one selected pattern, exact kept-kernel count, pruned zeros +0.0."""
    allowed = np.asarray(pruner.patterns, dtype=np.int64)
    assert len(set(pruner.patterns)) == len(pruner.patterns) == 8
    masks = pruner.masks()
    for fqn in pruner.tensor_fqns:
        w = weight_of(model, fqn)
        km = kernel_masks(w)
        live = km != 0
        assert ((km[live][:, None] & ~allowed) == 0).any(axis=1).all(), f"{fqn}: kernel outside the patterns"
        assert int(live.sum()) == kept_kernel_count(km.size, rate)
        if masks:
            pruned = ~masks[fqn].numpy()
            assert (w[pruned] == 0).all() and not np.signbit(w[pruned]).any()
            assert int(masks[fqn].numpy().reshape(*km.shape, 9).any(-1).sum()) == kept_kernel_count(km.size, rate)


def test_admm_reaches_both_constraints_on_fashion_mnist(fashion, dense) -> None:
    model = copy_of(dense)
    pruner = PatternADMMPruner(n_patterns=8, rho=1e-2, rho_growth=2.0, rho_max=1.0, admm_interval=8)
    pruner.prepare(model)
    assert pruner.tensor_fqns == ["3.weight", "7.weight"]  # the first conv stays dense
    optimizer = sgd(model)  # reused for retraining: its momentum must not revive pruned weights
    generator = torch.Generator().manual_seed(1)
    first = pruner.residuals()
    for _ in range(2):
        train_epoch(model, fashion["xtr"], fashion["ytr"], optimizer, pruner=pruner, batch_size=64,
                    generator=generator, progress=False)
    assert pruner.rounds == 2 * 32 // 8
    last = pruner.residuals()
    assert all(last[f]["pattern"] < first[f]["pattern"] for f in first), (first, last)
    pruner.hard_prune(optimizer)
    assert pruner.admm_loss().item() == 0.0 and not pruner.step()
    assert_constraints(model, pruner, 3.6)
    train_epoch(model, fashion["xtr"], fashion["ytr"], optimizer, pruner=pruner, batch_size=64,
                generator=generator, progress=False)
    assert_constraints(model, pruner, 3.6)
    pruner.verify()
    accuracy = evaluate(model, fashion["xte"], fashion["yte"])
    assert accuracy > 0.5, accuracy  # 10 classes: chance is 0.1
    pruner.squash_mask()
    assert pruner.masks() and not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert_constraints(model, pruner, 3.6)


def test_magnitude_baseline_meets_the_same_constraints(fashion, dense) -> None:
    model = copy_of(dense)
    optimizer = sgd(model)
    pruner = magnitude_prune(model, [{"tensor_fqn": "3.weight", "connectivity": 2.0},
                                     {"tensor_fqn": "7.weight"}], optimizer=optimizer)
    train_epoch(model, fashion["xtr"][:512], fashion["ytr"][:512], optimizer, batch_size=64, progress=False)
    rows = {r["tensor_fqn"]: r for r in pruner.report()}
    assert rows["3.weight"]["kept_kernels"] == kept_kernel_count(128, 2.0) == 64
    assert rows["7.weight"]["kept_kernels"] == kept_kernel_count(256, 3.6) == 71
    assert all(r["within_patterns"] for r in rows.values())
    pruner.verify()


def _batches(fashion, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(fashion["xtr"][k * 32:(k + 1) * 32], fashion["ytr"][k * 32:(k + 1) * 32]) for k in range(n)]


def _train_steps(model, optimizer, pruner, batches) -> None:
    model.train()
    for xb, yb in batches:
        loss = nn.functional.cross_entropy(model(xb), yb) + pruner.admm_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        elif isinstance(a[key], list):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                _assert_same_state(x, y) if isinstance(x, dict) else _assert_equal(x, y)
        else:
            _assert_equal(a[key], b[key])


def _assert_equal(x, y) -> None:
    if torch.is_tensor(x):
        assert torch.equal(x, y)
    else:
        assert x == y


@pytest.mark.parametrize("phase", ["admm", "masked"])
def test_checkpoint_resume_round_trip(fashion, dense, tmp_path, phase) -> None:
    model = copy_of(dense)
    optimizer = sgd(model)
    pruner = PatternADMMPruner(rho=1e-2, admm_interval=2).prepare(model)
    _train_steps(model, optimizer, pruner, _batches(fashion, 5))
    if phase == "masked":
        pruner.hard_prune(optimizer)
        _train_steps(model, optimizer, pruner, _batches(fashion, 2))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, pruner=pruner, epoch=3, extra={"note": "x"})

    fresh = tiny_cnn(seed=123)
    fresh_opt = sgd(fresh)
    fresh_pruner = PatternADMMPruner().prepare(fresh)
    info = load_checkpoint(path, model=fresh, optimizer=fresh_opt, pruner=fresh_pruner)
    assert info == {"epoch": 3, "extra": {"note": "x"}}
    assert fresh_pruner.phase == phase
    _assert_same_state(model.state_dict(), fresh.state_dict())
    _assert_same_state(optimizer.state_dict(), fresh_opt.state_dict())
    _assert_same_state(pruner.state_dict(), fresh_pruner.state_dict())

    more = _batches(fashion, 9)[5:]  # both continue identically (and masks keep holding)
    _train_steps(model, optimizer, pruner, more)
    _train_steps(fresh, fresh_opt, fresh_pruner, more)
    _assert_same_state(model.state_dict(), fresh.state_dict())
    _assert_same_state(pruner.state_dict(), fresh_pruner.state_dict())
    if phase == "masked":
        fresh_pruner.verify()


def test_checkpoint_errors(tmp_path, dense) -> None:
    with pytest.raises(PatDNNError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", model=tiny_cnn())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PatDNNError, match="cannot read"):
        load_checkpoint(tmp_path / "bad.pt", model=tiny_cnn())
    model = copy_of(dense)
    save_checkpoint(tmp_path / "m.pt", model=model, pruner=PatternADMMPruner().prepare(model, [{"tensor_fqn": "3.weight"}]))
    with pytest.raises(PatDNNError, match="prepared for"):
        load_checkpoint(tmp_path / "m.pt", model=tiny_cnn(), pruner=PatternADMMPruner().prepare(tiny_cnn()))


def test_onnx_export_keeps_sparsity_and_matches_torch(fashion, dense, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = copy_of(dense)
    pruner = magnitude_prune(model, [{"tensor_fqn": "3.weight", "connectivity": 2.0}, {"tensor_fqn": "7.weight"}])
    pruner.squash_mask()
    path = tmp_path / "pruned.onnx"
    export_pruned_onnx(model, fashion["xte"][:1], path)
    proto = onnx.load(str(path))
    zeros = {fqn: int((model.get_parameter(fqn) == 0).sum()) for fqn in pruner.tensor_fqns}
    conv_weights = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if len(i.dims) == 4]
    for fqn, n_zero in zeros.items():
        shape = tuple(model.get_parameter(fqn).shape)
        assert any(w.shape == shape and int((w == 0).sum()) == n_zero for w in conv_weights), fqn
    x = fashion["xte"][:4]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    (got,) = ReferenceEvaluator(proto).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_detects_lost_sparsity(tmp_path) -> None:
    model = tiny_cnn()
    with pytest.raises(PatDNNError, match="not a parameter|does not have"):
        export_pruned_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "x.onnx", check_fqns=["nope.weight"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([{"tensor_fqn": "9.weight"}], "not a parameter"),
        ([{"tensor_fqn": "10.weight"}], "no fc rate"),
        ([{"tensor_fqn": "4.weight"}], "not the weight of an nn.Conv2d or nn.Linear"),
        ([{"tensor_fqn": "3.weight", "pointwise": 4}], "a 3x3 conv layer: 'pointwise' does not apply"),
        ([{"tensor_fqn": "3.weight", "block": (4, 1)}], "'block' does not apply"),
        ([{"tensor_fqn": "10.weight", "fc": 0.5}], "fc rate must be a finite number >= 1"),
        ([{"tensor_fqn": "10.weight", "fc": 2, "block": (16, 1)}], "block 16x1 does not fit a layer with 10 output"),
        ([{"tensor_fqn": "3.bias"}], "not a parameter|not the weight"),
        ([{"tensor_fqn": "3.weight", "connectivity": 1000}], "keeps no kernel"),
        ([{"tensor_fqn": "3.weight", "connectivity": 0.5}], ">= 1"),
        ([{"tensor_fqn": "3.weight", "typo": 1}], "nothing else"),
        ([{"tensor_fqn": "3.weight"}, {"tensor_fqn": "3.weight"}], "twice"),
        ([], "empty"),
    ],
)
def test_bad_config_raises(config, message) -> None:
    with pytest.raises(PatDNNError, match=message):
        PatternADMMPruner().prepare(tiny_cnn(), config)


def test_non_3x3_conv_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 5), nn.Conv2d(4, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, groups=4),
                          nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 4, 1))
    for fqn, message in (("1.weight", "not 3x3"), ("2.weight", "dilated"), ("3.weight", "depthwise"),
                         ("4.weight", "cannot be pruned: grouped"), ("5.weight", "a 1x1 conv layer: 'connectivity'")):
        with pytest.raises(PatDNNError, match=message):
            PatternADMMPruner().prepare(model, [{"tensor_fqn": fqn, **({"connectivity": 2} if fqn == "5.weight" else {})}])
    with pytest.raises(PatDNNError, match="no prunable"):
        default_config(model)  # 1x1 convs only with pointwise=RATE
    assert default_config(model, pointwise=2.0) == [{"tensor_fqn": "5.weight", "pointwise": 2.0, "block": (4, 1)}]


def test_phase_errors(dense) -> None:
    pruner = PatternADMMPruner()
    with pytest.raises(PatDNNError, match="phase"):
        pruner.admm_loss()
    pruner.prepare(copy_of(dense))
    with pytest.raises(PatDNNError, match="phase"):
        pruner.squash_mask()
    with pytest.raises(PatDNNError, match="rho"):
        PatternADMMPruner(rho=0.0)


def test_package_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; import tvm_patdnn, tvm_patdnn.pruning, tvm_patdnn.datasets; "
            "assert 'tvm_patdnn.pruning.admm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pretrained_mnist_cnn_from_packages() -> None:
    from tvm_patdnn.datasets import MNIST_MEAN, MNIST_STD, load_mnist, load_pretrained_mnist_cnn

    try:
        x, y = load_mnist("test")
        model = load_pretrained_mnist_cnn()
    except PatDNNError as exc:
        pytest.skip(f"MNIST packages missing: {exc}")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    accuracy = evaluate(model, (torch.from_numpy(x[:1000]) - MNIST_MEAN) / MNIST_STD, torch.from_numpy(y[:1000]))
    assert accuracy > 0.98, accuracy
    assert default_config(model) == [{"tensor_fqn": "conv_layers.3.weight", "connectivity": 3.6},
                                     {"tensor_fqn": "conv_layers.6.weight", "connectivity": 3.6}]


# --- pointwise (1x1) and FC layers ---------------------------------------------------------------


def bottleneck_cnn(seed: int = 0) -> nn.Module:
    """Stem, 1x1 reduce → 3x3 → 1x1 expand (18 channels: not a multiple of the 4x1 block), two Linears."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 18, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(18 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def _block_count(mask: np.ndarray, block: tuple[int, int]) -> int:
    o, i = mask.shape[:2]
    bo, bi = block
    padded = np.zeros((-(-o // bo) * bo, -(-i // bi) * bi), bool)
    padded[:o, :i] = mask.reshape(o, i)
    return int(padded.reshape(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi).any(axis=(1, 3)).sum())


def test_admm_pointwise_and_fc_on_fashion_mnist(fashion, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from tvm_patdnn.pruning import prune_onnx
    from tvm_patdnn.pruning.projection import kept_block_count, project_pointwise

    model = bottleneck_cnn()
    optimizer = sgd(model)
    xtr, ytr = fashion["xtr"][:1024], fashion["ytr"][:1024]
    generator = torch.Generator().manual_seed(0)
    train_epoch(model, xtr, ytr, optimizer, batch_size=64, generator=generator, progress=False)
    pruner = PatternADMMPruner(n_patterns=8, rho=1e-2, rho_growth=2.0, admm_interval=4, pointwise=4, fc=2.0)
    pruner.prepare(model)
    # The first conv and the classifier stay dense; 1x1 convs get (4, 1) blocks at 4x, the hidden Linear 2x.
    assert pruner.tensor_fqns == ["3.weight", "6.weight", "9.weight", "12.weight"]
    for _ in range(2):
        train_epoch(model, xtr, ytr, optimizer, pruner=pruner, batch_size=64, generator=generator, progress=False)
    assert pruner.rounds == 2 * 16 // 4
    # One more round by hand: Z is the exact block projection of W + U, and U accumulates W - Z.
    target = pruner.penalty.variables["9.weight"]
    w, u, rho = target.weight.detach().clone(), target.u.clone(), pruner.rho
    pruner.admm_update()
    z = project_pointwise((w + u).numpy(), 4, (4, 1))
    assert np.array_equal(target.z.numpy(), z)
    torch.testing.assert_close(target.u, (u + w - torch.from_numpy(z)) * (rho / pruner.rho))
    assert set(pruner.residuals()["9.weight"]) == {"pattern", "connectivity"}
    masks = pruner.hard_prune(optimizer)
    train_epoch(model, xtr, ytr, optimizer, pruner=pruner, batch_size=64, generator=generator, progress=False)
    pruner.verify()
    rows = {r["tensor_fqn"]: r for r in pruner.report()}
    assert [rows[f]["kind"] for f in pruner.tensor_fqns] == ["pointwise", "pattern", "pointwise", "fc"]
    for fqn, blocks, rate in (("3.weight", 4 * 8, 4), ("9.weight", 5 * 16, 4), ("12.weight", 8 * 882, 2.0)):
        w = weight_of(model, fqn)
        assert rows[fqn]["blocks"] == blocks and rows[fqn]["expected_blocks"] == kept_block_count(blocks, rate)
        assert _block_count(masks[fqn].numpy(), (4, 1)) == kept_block_count(blocks, rate)
        assert _block_count(w != 0, (4, 1)) == rows[fqn]["kept_blocks"] <= rows[fqn]["expected_blocks"]
        assert (w[~masks[fqn].numpy()] == 0).all() and not np.signbit(w[~masks[fqn].numpy()]).any()
    assert rows["3.weight"]["kept_fraction"] == 0.25 and rows["6.weight"]["within_patterns"]
    assert evaluate(model, fashion["xte"], fashion["yte"]) > 0.2  # still learning: chance is 0.1 (1024 images seen 6 times)

    # Checkpoint round trip keeps the blocks; a pruner with another granularity refuses it.
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, pruner=pruner)
    fresh, fresh_opt = bottleneck_cnn(seed=5), None
    fresh_opt = sgd(fresh)
    fresh_pruner = PatternADMMPruner(pointwise=4, fc=2.0).prepare(fresh)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, pruner=fresh_pruner)
    _assert_same_state(pruner.state_dict(), fresh_pruner.state_dict())
    other = bottleneck_cnn()
    with pytest.raises(PatDNNError, match="block"):
        load_checkpoint(path, model=other, pruner=PatternADMMPruner(pointwise=4, fc=2.0, pointwise_block=(8, 1)).prepare(other))

    # ONNX export keeps every zero (1x1 convs and Linear too) and computes what torch computes;
    # prune_onnx on the export with the same rates finds the constraints already met.
    pruner.squash_mask()
    export = export_pruned_onnx(model, fashion["xte"][:1], tmp_path / "pruned.onnx")
    x = fashion["xte"][:4]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    (got,) = ReferenceEvaluator(export).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    res = prune_onnx(export, connectivity=3.6, pointwise=4, fc=2.0)
    pruned = {r.name: r for r in res.layers if r.action == "pruned"}
    assert sorted(r.block for r in pruned.values() if r.block) == [(4, 1)] * 3
    before = {i.name: onnx.numpy_helper.to_array(i) for i in export.graph.initializer}
    for init in res.model.graph.initializer:
        if init.name in {r.weight for r in pruned.values() if r.block}:
            assert np.array_equal(onnx.numpy_helper.to_array(init), before[init.name])


def test_pointwise_pruner_options_are_checked() -> None:
    for kwargs, message in (({"pointwise": 0.5}, "pointwise rate must be a finite number >= 1"),
                            ({"fc": float("nan")}, "fc rate must be"),
                            ({"pointwise_block": "4x"}, "two positive integers")):
        with pytest.raises(PatDNNError, match=message):
            PatternADMMPruner(**kwargs)
    with pytest.raises(PatDNNError, match="keeps no block"):
        PatternADMMPruner().prepare(bottleneck_cnn(), [{"tensor_fqn": "3.weight", "pointwise": 1000}])
