"""Experiment (b): a small VGG-style CNN trained from scratch on Fashion-MNIST, pruned at 8x.

Six 3x3 convs (16,16 | 32,32 | 64,64 channels, BatchNorm, max-pool after each pair) and a
576→128→10 classifier, sized so the whole experiment fits in about an hour on one shared
core. All convs but the first get 8 patterns (4 taps) and 3.6x connectivity: 8.1x fewer
weights in the pruned layers. One command::

    python -m benchmarks.accuracy.fashion_vgg
    python -m benchmarks.accuracy.fashion_vgg --dense-epochs 10 --seeds 0 1 --rates 2 3.6

The dense model of each seed is checkpointed in ``--workdir`` (with its training time), so a
rerun or a resumed run reuses it. Data: Debian ``dataset-fashion-mnist`` (60k train / 10k test).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .common import add_common_args, budget_from_args, load_fashion, run_experiment, train_dense


class SmallVGG(nn.Module):
    """VGG-style: three stages of two conv3x3-BN-ReLU and a 2x2 max-pool, then an MLP head."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), n_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 3 * 3, 128), nn.ReLU(inplace=True), nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, admm_epochs=4, retrain_epochs=3, seeds=[0])
    parser.add_argument("--dense-epochs", type=int, default=8)
    parser.add_argument("--dense-only", action="store_true", help="train/cache the dense models and stop")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_fashion(args.train_subset)
    dense = {seed: train_dense("fashion_vgg", SmallVGG, seed, args.dense_epochs, data, args.workdir, args.progress)
             for seed in args.seeds}
    if args.dense_only:
        return
    run_experiment(
        name="fashion_vgg", title="Small VGG (6 conv3x3) on Fashion-MNIST", args=args,
        budget=budget_from_args(args), data=data,
        dense_model=lambda seed: dense[seed][0],
        extra_meta={"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "model": "SmallVGG widths 16/32/64 + BN",
                    "dense_epochs": args.dense_epochs, "dense_train_s": {str(s): d[1] for s, d in dense.items()}},
    )


if __name__ == "__main__":
    main()
