"""The signature file written next to an exported library: how to call it, without the model.

A TVM library knows its functions, not what they expect: the Relax VM keeps parameter names but
no shapes, dtypes, output names or the target it was built for. ``tvm_patdnn.load`` needs all of
them to check inputs and name outputs, so ``CompiledModel.export_library("model.so")`` also writes
``model.so.json``:

    {"format": "tvm_patdnn.signature/1", "library_sha256": "…", "target": {…TVM target JSON…},
     "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "dtype": "float32"}], "outputs": ["logits"]}

Why beside the library and not inside it: the library stays a plain TVM library (it loads with
``tvm.runtime.load_module`` + ``relax.VirtualMachine`` exactly as before, nothing added to its code
or symbols); the signature can be read without loading the library, which matters for aarch64 and
Android libraries this machine cannot dlopen; and a person can read it. Putting it inside would
mean a data object compiled and linked per target with each target's compiler plus an ELF reader,
or a change to the compile pipeline. Both files are written atomically, the library first; the
signature records the library's SHA-256, so a library replaced without its signature (or copied
next to a stale one) is reported instead of being called with the wrong shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

from .errors import PatDNNError
from .fileio import write_bytes_atomic

__all__ = ["FORMAT", "Signed", "read_signature", "signature_path", "write_signature"]

FORMAT = "tvm_patdnn.signature/1"


class Signed(Protocol):
    """What a signature describes (``CompiledModel`` has it)."""

    target: Any
    input_names: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    output_names: list[str]


def signature_path(library: str | os.PathLike) -> Path:
    """``model.so`` -> ``model.so.json``."""
    return Path(f"{os.fspath(library)}.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_signature(library: str | os.PathLike, model: Signed) -> Path:
    """Write the signature of the (already written) ``library`` atomically; returns its path."""
    library = Path(library)
    document = {
        "format": FORMAT,
        "library_sha256": _sha256(library),
        "target": json.loads(str(model.target)),
        "inputs": [{"name": n, "shape": list(model.input_shapes[n]), "dtype": model.input_dtypes[n]}
                   for n in model.input_names],
        "outputs": list(model.output_names),
    }
    path = signature_path(library)
    write_bytes_atomic(path, (json.dumps(document, indent=1) + "\n").encode())
    return path


def read_signature(library: str | os.PathLike) -> dict[str, Any]:
    """The signature of ``library`` as ``CompiledModel`` fields (``target`` as TVM target JSON
    text), checked against the library's bytes; PatDNNError naming what is missing or wrong."""
    library = Path(library)
    if not library.is_file():
        raise PatDNNError(f"compiled library {library} does not exist or is not a file")
    path = signature_path(library)
    if not path.is_file():
        raise PatDNNError(
            f"{library} has no signature file {path} (input names, shapes, dtypes, outputs, target): "
            "export the library with tvm_patdnn (`patdnn compile ... -o LIB` or CompiledModel.export_library), "
            "which writes both; a library exported by plain TVM loads with tvm.runtime.load_module + "
            "relax.VirtualMachine"
        )
    try:
        document = json.loads(path.read_text())
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT!r}")
        inputs = document["inputs"]
        fields = {
            "target": json.dumps(document["target"]),
            "input_names": [str(i["name"]) for i in inputs],
            "input_shapes": {str(i["name"]): tuple(int(d) for d in i["shape"]) for i in inputs},
            "input_dtypes": {str(i["name"]): str(i["dtype"]) for i in inputs},
            "output_names": [str(o) for o in document["outputs"]],
        }
        recorded = str(document["library_sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PatDNNError(f"signature file {path} is unreadable or malformed: {err}") from None
    if recorded != _sha256(library):
        raise PatDNNError(
            f"signature file {path} does not belong to {library} (the library's SHA-256 differs from the "
            "one recorded at export): export the model again, or keep each library with its own .json"
        )
    return fields
