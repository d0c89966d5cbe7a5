"""PyTorch models straight in: compile(module, example_inputs=...), report rows named after modules."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch path needs the train extra (torch)")
from torch import nn  # noqa: E402

import tvm_patdnn  # noqa: E402
from tvm_patdnn import PatDNNError  # noqa: E402
from tvm_patdnn.pruning.admm import PatternADMMPruner  # noqa: E402
from tvm_patdnn.torch_frontend import module_path  # noqa: E402
from tvm_patdnn.verify import relative_error  # noqa: E402


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv1(x)) + x)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Block(16), nn.Conv2d(16, 8, 3, stride=2, padding=1))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics to fold
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net


def test_a_pattern_pruned_module_compiles_matches_torch_and_names_its_convs():
    net = small_net()
    pruner = PatternADMMPruner(n_patterns=8)
    pruner.prepare(net)
    pruner.hard_prune()
    pruner.squash_mask()
    x = torch.randn(2, 3, 12, 12)
    compiled = tvm_patdnn.compile(net, "x86", example_inputs=(x,))
    assert net.training  # compiled as in eval mode; the module's own mode is restored
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    actual = compiled.run(input=x.numpy())[0]
    assert relative_error(actual, expected) <= 2e-5
    kinds = {record.name: record.kind for record in compiled.report}
    assert kinds == {"0": "dense", "2.conv1": "pattern", "3": "pattern"}


def test_a_module_needs_example_inputs_and_only_a_module_takes_them():
    with pytest.raises(PatDNNError, match="needs example_inputs"):
        tvm_patdnn.compile(small_net())
    with pytest.raises(PatDNNError, match="example_inputs must hold torch tensors"):
        tvm_patdnn.inspect(small_net(), example_inputs=(np.zeros((1, 3, 8, 8)),))
    with pytest.raises(PatDNNError, match="only for torch.nn.Module"):
        tvm_patdnn.inspect("model.onnx", example_inputs=(torch.zeros(1),))
    with pytest.raises(PatDNNError, match="cannot export the PyTorch model"):
        tvm_patdnn.inspect(small_net(), example_inputs=(torch.zeros(1, 5, 8, 8),))  # 5 channels into a 3-channel conv


@pytest.mark.parametrize(("scope", "module"), [("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
                                               ("/features/features.3/Conv", "features.3"),
                                               ("/2/conv1/Conv", "2.conv1"), ("/Conv", "")])
def test_module_path_from_a_node_scope(scope, module):
    assert module_path(scope) == module
