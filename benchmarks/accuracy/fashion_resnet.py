"""Experiment (c): a small bottleneck ResNet on Fashion-MNIST, 3x3 convs at 8x and 1x1 convs at 4x.

The 1x1 convs carry about half the work of a bottleneck ResNet, so pattern pruning of the 3x3
convs alone cannot speed it up much; this experiment measures what pruning the 1x1 convs too
costs in accuracy. The model is a ResNet-50 in miniature, sized so that two seeds of dense,
magnitude and ADMM training fit in about an hour on one shared core: a stride-2 3x3 stem
(1→24, BN, ReLU, 14x14), three bottleneck blocks (1x1 reduce → 3x3 → 1x1 expand, BN after
each, 1x1 projection or identity shortcut, ReLU after the add): 24→16→64 at 14x14, 64→32→128
with stride 2 in the 3x3 and 128→32→128 at 7x7; global average pool and a 128→10 classifier. All 3x3 convs but the stem get 8 patterns (4 taps) and 3.6x connectivity
(8.1x fewer weights), all 1x1 convs (shortcut projections included) keep 1/4 of their weights
in blocks of 4 output channels. One command::

    python -m benchmarks.accuracy.fashion_resnet                      # seeds 0 1, defaults below
    python -m benchmarks.accuracy.fashion_resnet --pointwise-block 1x1 --methods admm --name fashion_resnet_1x1

Data: Debian ``dataset-fashion-mnist`` (60k train / 10k test).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .common import add_common_args, budget_from_args, load_fashion, run_experiment, train_dense


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class Bottleneck(nn.Module):
    """1x1 reduce → 3x3 (stride) → 1x1 expand, BN after each, residual add, ReLU (ResNet v1.5)."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(c_in, width, 1), nn.ReLU(inplace=True),
            *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(width, c_out, 1),
        )
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class SmallBottleneckResNet(nn.Module):
    """Stride-2 stem, one bottleneck block at 14x14 (64 ch, 16 inside), two at 7x7 (128 ch, 32 inside)."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 24, 3, stride=2), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(Bottleneck(24, 16, 64), Bottleneck(64, 32, 128, stride=2), Bottleneck(128, 32, 128))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, admm_epochs=3, retrain_epochs=3, seeds=[0, 1], pointwise=4.0)
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--dense-only", action="store_true", help="train/cache the dense models and stop")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_fashion(args.train_subset)
    dense = {seed: train_dense("fashion_resnet", SmallBottleneckResNet, seed, args.dense_epochs, data, args.workdir,
                               args.progress, lr=0.1)
             for seed in args.seeds}
    if args.dense_only:
        return
    run_experiment(
        name="fashion_resnet", title="Small bottleneck ResNet (1x1-3x3-1x1 blocks) on Fashion-MNIST", args=args,
        budget=budget_from_args(args), data=data,
        dense_model=lambda seed: dense[seed][0],
        extra_meta={"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
                    "model": "SmallBottleneckResNet: stem 3x3/2 24, blocks 24-16-64 @14x14, 64-32-128/2 and 128-32-128 @7x7, BN",
                    "dense_epochs": args.dense_epochs, "dense_train_s": {str(s): d[1] for s, d in dense.items()}},
    )


if __name__ == "__main__":
    main()
