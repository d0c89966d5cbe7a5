"""Fully connected layer ``out[m, n] = act(sum_k x[m, k] * w[k, n] + bias[n])`` with constant
weights, as scheduled TIR.

At the batch sizes of inference (1, 2) an FC layer is a matrix-vector product: every weight is
used once (or twice) per inference, so the time is the time to stream the weights from memory
(ResNet-50's 2048x1000 head: 8 MB; VGG-16's first FC: 411 MB). The kernel is built for that:

* weights packed at compile time as ``[blocks][K][B]``: a block of ``B = vectors x lanes``
  output features over the whole reduction is one contiguous stream (the hardware prefetcher
  follows it; a row-major ``[K][N]`` weight read ``B`` columns at a time touches a new cache
  line every row and left the legalized matmul at ~1 GB/s);
* one parallel task per block, ``rows x vectors`` accumulators in registers, each input value
  broadcast once per ``k``; a batch larger than the row tile is swept in row tiles (the block's
  weights then come from L2 for the later ones);
* the last block (and row tile) overlaps the one before instead of a masked tail: the packed
  weights of the last block simply start ``N - B`` columns in, so every load and store is a full
  vector; fewer features than a vector get one narrower vector;
* bias and ReLU / clip applied to the accumulators before the one store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div
from .activation import activate, check_activation

__all__ = ["FullyConnectedSpec", "FULLY_CONNECTED_ATTR", "fully_connected_primfunc", "pack_fully_connected_weight"]

# PrimFunc attribute carrying the kernel's description (benchmarks and tests look for it).
FULLY_CONNECTED_ATTR = "patdnn.fully_connected"


@dataclass(frozen=True)
class FullyConnectedSpec:
    """Static description of one fully connected layer and its register tile."""

    rows: int  # M: the batch
    in_features: int  # K
    out_features: int  # N
    has_bias: bool = False
    activation: str = "none"  # ACTIVATIONS; "clip" uses clip_min/clip_max
    clip_min: float = 0.0
    clip_max: float = 6.0
    lanes: int = 8
    vectors: int = 8  # feature vectors per block
    row_tile: int = 1

    def __post_init__(self):
        check_activation(self.activation)
        if self.block > self.out_features or self.row_tile > self.rows:
            raise ValueError(f"a {self.row_tile}x{self.block} tile exceeds the {self.rows}x{self.out_features} output")

    @classmethod
    def for_target(cls, registers: int, lanes: int, vectors: int | None = None, **shape) -> FullyConnectedSpec:
        """The spec with the register tile of a target with ``registers`` vectors of ``lanes``:
        ``vectors`` feature vectors per block (default 8 at batch 1: longer contiguous weight runs
        per ``k`` streamed ~10% faster than 4 in interleaved runs of the 2048->1000 and
        1280->1000 heads; 4 for larger batches, so rows share each loaded weight vector), fewer
        if there are fewer features, one narrower vector below one vector; as many batch rows as
        the registers left after the weight vectors and a broadcast hold."""
        probe = cls(**shape, lanes=1, vectors=1, row_tile=1)
        vectors = vectors or (8 if probe.rows == 1 else 4)
        n = probe.out_features
        if n < lanes:
            lanes, vectors = n, 1
        vectors = max(1, min(vectors, n // lanes))
        row_tile = max(1, min(probe.rows, (registers - vectors - 2) // vectors))
        return cls(**shape, lanes=lanes, vectors=vectors, row_tile=row_tile)

    @property
    def block(self) -> int:
        """Output features per block (per parallel task)."""
        return self.vectors * self.lanes

    @property
    def blocks(self) -> int:
        return ceil_div(self.out_features, self.block)

    def block_start(self, index: int) -> int:
        """First feature of block ``index``: the last block overlaps the one before."""
        return min(index * self.block, self.out_features - self.block)

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.in_features * self.out_features


def pack_fully_connected_weight(weight: np.ndarray, spec: FullyConnectedSpec) -> np.ndarray:
    """``[K, N]`` weight as ``[blocks][K][B]``, block ``b`` holding features ``block_start(b)...``."""
    starts = [spec.block_start(b) for b in range(spec.blocks)]
    return np.ascontiguousarray(np.stack([weight[:, s:s + spec.block] for s in starts]).astype(np.float32))


def fully_connected_primfunc(spec: FullyConnectedSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one FC layer.

    Arguments, in order: data (M, K), packed weight (blocks, K, B), [bias (N,)], out (M, N).
    """
    m_, k_, n_ = spec.rows, spec.in_features, spec.out_features
    mr, width = spec.row_tile, spec.block
    row_tiles = ceil_div(m_, mr)
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((m_, k_), "float32"))
            weight = T.arg("weight", T.buffer((spec.blocks, k_, width), "float32"))
            bias = T.arg("bias", T.buffer((n_,), "float32")) if spec.has_bias else None
            out = T.arg("out", T.buffer((m_, n_), "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            with T.parallel(0, spec.blocks) as b:
                base = T.min(b * width, n_ - width)  # block_start
                with T.serial(0, row_tiles) as rt:
                    r0 = T.min(rt * mr, m_ - mr)
                    # "local" is heap workspace in TVM 0.27 (a call pair per row tile, LLVM keeps the sums
                    # in registers through K); "global" (a stack alloca) tied: Zen 3, 1 thread, the
                    # benchmarks.heads FC layers local / global 0.96-1.08x, 0.995x overall (11 rounds).
                    acc = T.decl_buffer((mr * width,), "float32", scope="local")
                    with T.unroll(0, mr) as i:
                        with T.vectorized(0, width) as j:
                            T.buffer_store(acc, zero, [i * width + j])
                    with T.serial(0, k_) as k:
                        with T.unroll(0, mr) as i:
                            with T.vectorized(0, width) as j:
                                T.buffer_store(acc, acc[i * width + j] + data[r0 + i, k] * weight[b, k, j], [i * width + j])
                    with T.unroll(0, mr) as i:
                        with T.vectorized(0, width) as j:
                            value = acc[i * width + j]
                            if bias is not None:
                                value = value + bias[base + j]
                            T.buffer_store(out, activate(value, spec), [r0 + i, base + j])
    func = builder.get().without_attr("global_symbol")  # the module names it when it is added
    return func.with_attr(FULLY_CONNECTED_ATTR, {"lanes": spec.lanes, "vectors": spec.vectors, "row_tile": mr})
