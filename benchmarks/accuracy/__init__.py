"""Accuracy experiments of PatDNN pruning (dense, one-shot, magnitude, ADMM) on real data.

Run each from the repository root as a module: ``python -m benchmarks.accuracy.mnist_cnn``.
"""
