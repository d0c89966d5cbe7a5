"""Reading models and writing files safely.

Every file the project writes goes through :func:`write_bytes_atomic` or
:func:`write_file_atomic`, so an interrupted run leaves either the old file or the whole new
one, never half of it. ONNX models are read through :func:`load_onnx_model`, which turns every
way a model can be unreadable into a :class:`PatDNNError` that names the problem.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from .errors import PatDNNError

__all__ = ["check_output_path", "load_onnx_model", "write_bytes_atomic", "write_file_atomic", "save_model_atomic",
           "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def load_onnx_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and check an ONNX model; a given ModelProto is copied, never modified."""
    if isinstance(model, onnx.ModelProto):
        proto = copy.deepcopy(model)
        source = "the given model"
    else:
        path = Path(model)
        source = str(path)
        if not path.is_file():
            raise PatDNNError(f"ONNX model {path} does not exist or is not a file")
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # protobuf decode errors, missing external data, ...
            raise PatDNNError(f"cannot read ONNX model {path}: {exc}") from exc
    if not proto.graph.node:
        raise PatDNNError(f"{source} is not an ONNX model (it has no graph nodes)")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise PatDNNError(f"{source} declares no ai.onnx opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise PatDNNError(f"{source} uses ONNX opset {opset}, which is not supported (supported: {MIN_OPSET}..{MAX_OPSET})")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise PatDNNError(f"{source} is not a valid ONNX model: {str(exc).strip().splitlines()[0]}") from exc
    _check_finite_weights(proto, source)
    return proto


def _check_finite_weights(proto: onnx.ModelProto, source: str) -> None:
    """A NaN or infinite weight is a broken model, not a value to compute with: a ReLU turns
    NaNs into zeros in the compiled code and into NaNs elsewhere, and pruning would rank them
    arbitrarily. So both ``prune`` and ``compile`` refuse it, naming the weight."""
    tensors = list(proto.graph.initializer) + [
        a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for tensor in tensors:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        values = onnx.numpy_helper.to_array(tensor)
        finite = np.isfinite(values)
        if not finite.all():
            raise PatDNNError(f"{source}: weight {tensor.name!r} has {int(finite.size - finite.sum())} non-finite "
                              "value(s) (NaN or infinity); fix or retrain the model")


def check_output_path(path: str | os.PathLike) -> Path:
    """The file to write for output ``path`` (a symlink's target), or PatDNNError when it cannot
    be one: its directory is missing, or it exists and is not a regular file. Only regular files
    are replaced: a rename over a device node, a FIFO or a socket would swap the system's file for
    ours (``-o /dev/null`` as root) and hand it the device's mode."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if not path.parent.is_dir():
        raise PatDNNError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise PatDNNError(f"cannot write {path}: it is {kind}; give the path of a file to create or replace")
    return path


def write_file_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Let ``write(tmp_path)`` produce a file, then move it onto ``path`` in one rename.

    The temporary file sits in the same directory (same file system, so the rename is
    atomic) and keeps ``path``'s suffix, because some writers (``export_library``,
    ``savefig``) choose the format from it. On any failure it is removed and ``path`` is
    untouched. Only regular files are replaced (:func:`check_output_path`); a symlink is followed,
    so the link stays and its target gets the new content. A new file gets the mode a plain
    ``open`` would give it, a replaced one keeps its own.
    """
    path = check_output_path(path)
    if path.is_file():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise PatDNNError(f"cannot write {path}: {exc}") from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PatDNNError(f"cannot write {path}: {exc}") from exc
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    write_file_atomic(path, write)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save an ONNX model as one file, atomically (see :func:`write_bytes_atomic`)."""
    try:
        data = model.SerializeToString()
    except Exception as exc:  # protobuf refuses messages over 2 GB
        raise PatDNNError(f"cannot serialise the model for {path}: {exc}") from exc
    write_bytes_atomic(path, data)
