"""Block-sparse 1x1 convolution on OpenCL GPUs (Adreno): the GPU schedule of the sparse pointwise operator.

Same storage as the CPU kernel of :mod:`tvm_patdnn.ops.sparse_pointwise` (block-compressed rows of
(``block``, 1) blocks from :func:`~tvm_patdnn.ops.sparse_pointwise.block_sparse_weight`, with one channel
block: ``starts[fb, 0]`` to ``starts[fb, 1]`` are filter block ``fb``'s kept blocks) and the same
bias / residual / ReLU / clip epilogue, mapped onto work items instead of a register tile:

* a work item computes one ``block``-filter block x ``vectors`` float4s of consecutive output pixels
  (flattened ``y * OW + x``, so a vector crosses rows and small images fill it); per kept block it
  loads the block's ``block`` weights as one float4, one input vector per pixel vector, and does
  ``block x pixels`` multiply-adds on accumulators in registers, written once;
* consecutive work items are consecutive pixel vectors of the same filter block: a wave walks one
  channel list in lockstep (no divergence but where a wave straddles two filter blocks), reads the
  same weights and channel index (one broadcast load for the wave) and neighbouring input vectors
  (coalesced: a wave of 64 reads 1 KB of one input channel's plane). The weights are shared by the block's 4
  filters, so an item reads each input vector once for 4 filters; no index is decoded beyond the
  channel list;
* work groups are whole waves, sized as the pattern conv's
  (:func:`~tvm_patdnn.arith.work_group_size`: 64 to 256 items on
  Adreno, within its 1024); items past the end idle;
* the last pixel vector of an image overlaps the one before instead of running a masked tail (the
  overlap's stores write identical values); images smaller than a vector get scalar items.

At stride 1 an item's input reads are ``vload4``s at any offset (7x7 planes are not
4-aligned: TVM's own vector loads would fall back to four scalar loads there); strided convs
gather their pixels (four scalar loads from offsets computed once per item). Output stores are
float4 ``vstore4``s; a residual is read as a float4 where TVM proves it 4-aligned (the shared
epilogue of :mod:`tvm_patdnn.ops.dense_conv`), else as four scalar loads.

Not measured: no phone or GPU is attached to this project's machines, so the kernel is verified
on PoCL (CPU OpenCL) only. Measuring it needs an Adreno phone on TVM RPC (``patdnn deploy
--target adreno``) and, per layer, this kernel against the dense legalized conv2d of the GPU
rules at the same shape; then ``vectors`` (1 or 2 float4s per item: more weight reuse against
fewer waves in flight) and the group size are the parameters to tune, and whether the
densities at which sparsity pays on the GPU are the CPU's ``MAX_DENSITY``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div, work_group_size
from .dense_conv import DenseConvSpec, _store_output
from .sparse_pointwise import SPARSE_POINTWISE_ATTR, SparsePointwiseSpec

__all__ = ["SparsePointwiseGPUSpec", "sparse_pointwise_gpu_primfunc"]

FLOAT4 = 4  # pixels per vector: Adreno's native fp32 vector


@dataclass(frozen=True)
class SparsePointwiseGPUSpec(SparsePointwiseSpec):
    """A 1x1 conv (any stride, no padding) with (``block``, 1) block-sparse weights on a GPU:
    ``conv.filter_tile`` is the block, ``conv.vectors x conv.lanes`` a work item's pixels, and the
    weight has one channel block."""

    wave: int = 64
    max_threads: int = 1024

    @classmethod
    def for_target(cls, wave: int, max_threads: int, block: int, nonzero_blocks: int, vectors: int = 1,
                   **shape) -> SparsePointwiseGPUSpec:
        """An item of ``vectors`` float4s of pixels (fewer when the image is smaller; one scalar
        pixel when it is smaller than a float4)."""
        pixels = DenseConvSpec(**shape, lanes=1, filter_tile=1, vectors=1).pixels
        lanes = FLOAT4 if pixels >= FLOAT4 else 1
        vectors = max(1, min(vectors, pixels // FLOAT4)) if lanes == FLOAT4 else 1
        return cls(DenseConvSpec(**shape, filter_tile=block, vectors=vectors, lanes=lanes), nonzero_blocks,
                   wave, max_threads)

    @property
    def channel_blocks(self) -> int:
        return 1

    @property
    def pixel_groups(self) -> int:
        """Work items per filter block and image."""
        return ceil_div(self.conv.pixels, self.conv.pixel_tile)

    @property
    def items(self) -> int:
        return self.conv.batch * self.filter_blocks * self.pixel_groups

    @property
    def group(self) -> int:
        return work_group_size(self.items, self.wave, self.max_threads)


def _input_loader(conv: DenseConvSpec, flat_in, base):
    """``load(x, row, jo)``: pixel vector ``jo`` of the item's tile (pixels ``base + jo * lanes + ji``)
    read from the input plane starting at ``row`` into ``x``. At stride 1 a float4 is one ``vload4``,
    which OpenCL allows at any float address (TVM's own vector loads need a provably 4-aligned
    address, which a 7x7 plane does not give); strided pixels are gathered from offsets computed
    once per item."""
    lanes = conv.lanes
    if conv.strides == (1, 1) and lanes == FLOAT4:
        def load(x, row, jo):
            pointer = T.address_of(flat_in[row + base + jo * lanes])
            T.buffer_store(x, T.call_pure_extern("float32x4", "vload4", 0, pointer), [T.Ramp(jo * lanes, 1, lanes)])
        return load
    offsets = None
    if conv.strides != (1, 1):
        offsets = T.decl_buffer((conv.pixel_tile,), "int32", scope="local")
        with T.unroll(0, conv.pixel_tile) as j:
            pixel = base + j
            T.buffer_store(offsets, pixel // conv.out_width * conv.strides[0] * conv.width
                           + pixel % conv.out_width * conv.strides[1], [j])

    def gather(x, row, jo):
        with T.vectorized(0, lanes) as ji:
            j = jo * lanes + ji
            T.buffer_store(x, flat_in[row + (base + j if offsets is None else offsets[j])], [j])
    return gather


def sparse_pointwise_gpu_primfunc(spec: SparsePointwiseGPUSpec) -> tirx.PrimFunc:
    """The scheduled (thread-bound) PrimFunc of one block-sparse 1x1 conv for OpenCL.

    Arguments, in order: data (N, C, H, W), values, channels, starts (a
    :class:`~tvm_patdnn.ops.sparse_pointwise.BlockSparseWeight` of one channel block),
    [bias (F,)], [residual (N, F, OH, OW)], out.
    """
    conv = spec.conv
    n_, c_, f_, p_ = conv.batch, conv.in_channels, conv.out_channels, conv.pixels
    mr, nr, lanes, tp = conv.filter_tile, conv.vectors, conv.lanes, conv.pixel_tile
    groups, plane = spec.pixel_groups, conv.height * conv.width
    out_shape = (n_, f_, conv.out_height, conv.out_width)
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, conv.height, conv.width), "float32"))
            values = T.arg("values", T.buffer((max(1, spec.nonzero_blocks), mr), "float32"))
            channels = T.arg("channels", T.buffer((max(1, spec.nonzero_blocks),), "int32"))
            starts = T.arg("starts", T.buffer((spec.filter_blocks, spec.channel_blocks + 1), "int32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if conv.has_bias else None
            residual = T.arg("residual", T.buffer(out_shape, "float32")) if conv.residual else None
            out = T.arg("out", T.buffer(out_shape, "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            flat_in = T.decl_buffer((n_ * c_ * plane,), "float32", data=data.data)
            flat_out = T.decl_buffer((n_, f_, p_), "float32", data=out.data)
            flat_res = T.decl_buffer((n_, f_, p_), "float32", data=residual.data) if residual is not None else None
            group = spec.group
            with T.launch_thread(T.env_thread("blockIdx.x"), ceil_div(spec.items, group)) as block_id:
                with T.launch_thread(T.env_thread("threadIdx.x"), group) as thread_id:
                    item = block_id * group + thread_id
                    with T.If(item < spec.items):
                        with T.Then():
                            fb = item // groups % spec.filter_blocks
                            n = item // (groups * spec.filter_blocks)
                            base = T.min(item % groups * tp, p_ - tp)
                            load = _input_loader(conv, flat_in, base)
                            acc = T.decl_buffer((mr * tp,), "float32", scope="local")
                            weights = T.decl_buffer((mr,), "float32", scope="local")
                            x = T.decl_buffer((tp,), "float32", scope="local")
                            with T.unroll(0, mr * nr) as i:
                                with T.vectorized(0, lanes) as j:
                                    T.buffer_store(acc, zero, [i * lanes + j])
                            with T.serial(starts[fb, 0], starts[fb, 1]) as e:
                                row = (n * c_ + channels[e]) * plane
                                with T.vectorized(0, mr) as i:
                                    T.buffer_store(weights, values[e, i], [i])
                                with T.unroll(0, nr) as jo:
                                    load(x, row, jo)
                                with T.unroll(0, mr) as i:
                                    with T.unroll(0, nr) as jo:
                                        with T.vectorized(0, lanes) as ji:
                                            slot = i * tp + jo * lanes + ji
                                            T.buffer_store(acc, acc[slot] + weights[i] * x[jo * lanes + ji], [slot])
                            _store_output(conv, acc, bias, flat_res, flat_out, n, fb, base)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(SPARSE_POINTWISE_ATTR, {"block": mr, "vectors": nr, "lanes": lanes,
                                                  "nonzero_blocks": spec.nonzero_blocks, "group": group})
