"""Every use of a TVM private (or protocol-internal) API, in one place, for apache-tvm 0.27.

Each item says why the public API is not enough. When TVM changes, this is the one module to
read and fix; nothing else in tvm_patdnn imports an underscore name of TVM or ``tvm.rpc.base``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import struct
import sys
import types
from collections.abc import Callable, Iterator

import tvm

# --- RPC wire protocol (tvm.rpc.base) -----------------------------------------------------------
# The tracker and server protocol (magic numbers, length-prefixed JSON messages). TVM's own
# clients block without a deadline (TrackerSession.request waits forever for a busy or vanished
# device), and the emulated phone serves sessions in a subprocess TVM's RPC server cannot start,
# so tvm_patdnn speaks the protocol itself with these helpers.
from tvm.rpc.base import (
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    RPC_MAGIC,
    RPC_TRACKER_MAGIC,
    TrackerCode,
    get_addr_family as address_family,
    random_key,
    recvall,
    recvjson,
    sendjson,
)

__all__ = [
    "TESTED_TVM", "TrackerCode", "RPC_CODE_MISMATCH", "RPC_CODE_SUCCESS", "RPC_MAGIC", "RPC_TRACKER_MAGIC",
    "address_family", "normalize_workload", "onnx_convert_map", "only_tensor_intrinsics", "random_key", "recvall",
    "recvjson", "return_exception", "sendjson", "set_pool_timeout", "swapped_onnx_converters", "tracker_handshake",
]

#: The TVM version every item below was checked against.
TESTED_TVM = "0.27"


def tracker_handshake(sock: socket.socket, where: str) -> None:
    """Send the tracker magic on a connected socket; RuntimeError unless the peer answers it."""
    sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
    if struct.unpack("<i", recvall(sock, 4))[0] != RPC_TRACKER_MAGIC:
        raise RuntimeError(f"{where} is not an RPC tracker")


def return_exception(fd: int, message: str) -> None:
    """Send an RPC exception reply on a raw session socket: ``tvm.rpc._ffi_api.ReturnException``
    is the only way to tell a client its session expired in the words TVM's client expects."""
    tvm.rpc._ffi_api.ReturnException(fd, message)


# --- meta_schedule --------------------------------------------------------------------------------
def normalize_workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """``tune_context._normalize_mod``: the IRModule form (``main``, noalias) TuneContext gives a
    PrimFunc. Task keys and database lookups must use exactly this form to match the workload
    hashes meta_schedule writes; there is no public function for it."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def set_pool_timeout(runner, seconds: float) -> None:
    """Bound each RPCRunner worker: its ``PopenPoolExecutor`` waits for workers without a limit
    unless ``_timeout`` is set, and RPCRunner has no parameter for it, so a device that vanishes
    without closing the connection would block a tune forever."""
    if hasattr(runner.pool, "_timeout"):
        runner.pool._timeout = seconds


_TENSOR_INTRINSICS = "tvm.s_tir.tensor_intrin"


@contextlib.contextmanager
def only_tensor_intrinsics(submodule: str) -> Iterator[None]:
    """While TuneContexts are made, register exactly ``tvm.s_tir.tensor_intrin.<submodule>``.

    TuneContext imports the whole ``tvm.s_tir.tensor_intrin`` package (~50 s of CPU, CUDA's
    intrinsics mostly) that fp32 CPU spaces never use, yet the default rules look up the target's
    int8 intrinsics by name when they are made. An empty package in ``sys.modules`` stands in for
    the slow one and imports only the target's submodule through it; that submodule stays
    imported, its intrinsics registered."""
    if _TENSOR_INTRINSICS in sys.modules:
        yield
        return
    from tvm import s_tir

    stub = types.ModuleType(_TENSOR_INTRINSICS)
    stub.__path__ = [os.path.join(os.path.dirname(s_tir.__file__), "tensor_intrin")]
    sys.modules[_TENSOR_INTRINSICS] = stub
    try:
        importlib.import_module(f"{_TENSOR_INTRINSICS}.{submodule}")
        yield
    finally:
        sys.modules.pop(_TENSOR_INTRINSICS, None)


# --- ONNX frontend --------------------------------------------------------------------------------
def onnx_convert_map() -> dict[str, type]:
    """``onnx_frontend._get_convert_map``: the ONNX operators TVM's importer converts, so an
    unsupported model fails with their names before the import starts, not deep inside it."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return onnx_frontend._get_convert_map()


@contextlib.contextmanager
def swapped_onnx_converters(extra: Callable[[], dict[str, type]]) -> Iterator[None]:
    """Add converters to TVM's ONNX importer for the duration of an import: ``from_onnx`` has no
    parameter for custom converters in 0.27, so its converter table function is swapped."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), **extra()}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
