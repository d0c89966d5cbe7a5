"""``tvm_patdnn.compile``: a (pruned) model in, a runnable and exportable module out."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx
import tvm
from tvm import relax

from .analysis import PatternOptions
from .errors import PatDNNError
from .fileio import write_file_atomic
from .frontend import check_inputs, load_model
from .pipeline import get_pipeline
from .report import ConvRecord, format_report
from .targets import is_host_runnable, resolve_target
from .transform import conv_report

if TYPE_CHECKING:
    import torch

    from .tuning.database import ScheduleSource

__all__ = ["CompiledModel", "compile", "inspect", "load"]


@dataclass
class CompiledModel:
    """A compiled model: ``run`` it on the host, ``export_library`` it, read its ``report``.

    ``tvm_patdnn.load`` gives the same interface for an exported library (``library`` is its path;
    ``report`` is empty and ``schedules`` None, since nothing was compiled in this process)."""

    executable: relax.VMExecutable | tvm.runtime.Module
    target: tvm.target.Target
    input_names: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    output_names: list[str]
    report: list[ConvRecord] = field(default_factory=list)
    schedules: ScheduleSource | None = None  # which tuning records scheduled which kernels
    library: Path | None = None  # the file it was loaded from (tvm_patdnn.load)
    _vm: relax.VirtualMachine | None = field(default=None, repr=False)

    @property
    def vm(self) -> relax.VirtualMachine:
        """The Relax VM that runs the model on this machine's CPU (made on first use), for callers
        that keep inputs as ``tvm.runtime.Tensor`` and call ``vm["main"]`` themselves."""
        if not is_host_runnable(self.target):
            raise PatDNNError(
                f"the model is compiled for {self.target.kind.name} target {self.target}, which this machine "
                "cannot run: run it on the device with `patdnn deploy` or tvm_patdnn.deploy(...)"
            )
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def run(self, inputs: dict[str, np.ndarray] | None = None, **named: np.ndarray) -> list[np.ndarray]:
        """Run on this machine's CPU; returns the graph's outputs in ONNX order."""
        vm = self.vm
        args = [tvm.runtime.tensor(a) for a in check_inputs(self, {**(inputs or {}), **named})]
        result = vm["main"](*args)
        outputs = list(result) if isinstance(result, (tvm.ir.Array, list, tuple)) else [result]
        return [o.numpy() for o in outputs]

    def export_library(self, path: str | os.PathLike, **kwargs) -> Path:
        """Write the library atomically (temp file, then rename), then its signature file
        ``PATH.json`` (tvm_patdnn.signature) that ``tvm_patdnn.load`` reads; aarch64 targets are
        cross-linked (tvm_patdnn.export) and every .so is checked to be an ELF for the target's CPU.
        A loaded model's library is copied: TVM cannot serialise a loaded library again."""
        from .export import export_checked
        from .signature import write_signature
        from .tvm_noise import filter_tvm_noise

        if self.library is not None:
            written = write_file_atomic(path, lambda tmp: shutil.copyfile(self.library, tmp))
        else:
            with filter_tvm_noise():  # "Scope Saving" lines after run(): see tvm_noise
                written = write_file_atomic(path, lambda tmp: export_checked(self.executable, tmp, self.target, **kwargs))
        write_signature(written, self)
        return written

    def format_report(self) -> str:
        table = format_report(self.report)
        return table if self.schedules is None else f"{table}\n{self.schedules}"


def load(library: str | os.PathLike) -> CompiledModel:
    """A library written by ``CompiledModel.export_library`` or ``patdnn compile``, back as a
    ``CompiledModel`` (``run``, input names/shapes/dtypes, output names, target), read from the
    library and its signature file (see tvm_patdnn.signature)."""
    from .signature import read_signature
    from .tvm_noise import filter_tvm_noise

    fields = read_signature(library)
    target = resolve_target(fields.pop("target"))
    if not is_host_runnable(target):
        raise PatDNNError(
            f"{library} is compiled for {target}, which this machine cannot load: run it on its device with "
            f"`patdnn deploy MODEL.onnx --so {library}` or tvm_patdnn.deploy(..., library=...)"
        )
    try:
        with filter_tvm_noise():  # "Scope Loaded" lines: see tvm_noise
            module = tvm.runtime.load_module(os.fspath(library))
    except (RuntimeError, OSError) as err:
        raise PatDNNError(f"cannot load {library}: {str(err).strip().splitlines()[-1]}") from None
    return CompiledModel(executable=module, target=target, library=Path(library), **fields)


def compile(  # noqa: A001 - mirrors tvm.compile
    model: str | os.PathLike | onnx.ModelProto | tvm.IRModule | torch.nn.Module,
    target: str | dict | tvm.target.Target = "x86",
    *,
    example_inputs: tuple | None = None,
    params: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    entries: int = 4,
    max_patterns: int = 12,
    tuning_db: str | os.PathLike | Literal[False] | None = None,
    threads: int | None = None,
) -> CompiledModel:
    """Compile a pattern-pruned model with the pattern pass.

    ``model`` is an ONNX file path, an ``onnx.ModelProto``, a Relax IRModule (whose ``main``
    takes the inputs first and then the weights named in ``params``) or a ``torch.nn.Module``
    with ``example_inputs`` (a tuple of tensors; exported through ONNX, see ``torch_frontend``;
    the report names convs after their modules).
    ``tuning_db`` is a database directory written by ``tvm_patdnn.tune``; its records for the
    target's device schedule the kernels they cover, and its dense kernel choices pick the kernel of
    the dense layers it measured. None uses the database shipped in
    ``tvm_patdnn/schedules/`` for the device, if any; False uses the default schedules only.
    Which records were applied to how many kernels is in ``CompiledModel.schedules``.
    ``threads`` is the number of threads the model will run with (TVM's runtime runs
    ``TVM_NUM_THREADS``): it becomes the CPU target's ``num-cores``, which the default schedules
    split their work for, and only records tuned for that many threads (or not saying their count)
    are applied: a kernel with records only for another count keeps the default rules (they beat
    such records), and ``schedules`` says how many did. None keeps the target's ``num-cores``
    (``x86``: this machine's CPUs); a target without one takes records of any count.
    """
    from .tuning.database import tuning_records_pass
    from .tuning.kernel_records import load_kernel_choices
    from .tuning.threads import check_threads, for_threads

    patterns = PatternOptions(entries, max_patterns)
    resolved = resolve_target(target)
    if check_threads(threads) is not None:
        resolved = for_threads(resolved, threads)
    imported = load_model(model, params=params, input_shapes=input_shapes, example_inputs=example_inputs)
    records: list[ConvRecord] = []
    tuned, schedules = tuning_records_pass(tuning_db, resolved)
    if schedules.path is not None:
        schedules.kernel_choices, schedules.dense_threads = load_kernel_choices(schedules.path, resolved)
    try:
        executable = tvm.compile(
            imported.mod, resolved, relax_pipeline=get_pipeline(resolved, patterns, records.append, tuned,
                                                                kernel_choices=schedules.kernel_choices)
        )
    except PatDNNError:
        raise
    except Exception as err:  # TVM's errors name C++ internals; say which stage failed
        raise PatDNNError(f"TVM failed to compile the model for {resolved}: {str(err).strip().splitlines()[-1]}") from err
    return CompiledModel(
        executable=executable,
        target=resolved,
        input_names=imported.input_names,
        input_shapes=imported.input_shapes,
        input_dtypes=imported.input_dtypes,
        output_names=imported.output_names,
        report=records,
        schedules=schedules,
    )


def inspect(
    model: str | os.PathLike | onnx.ModelProto | tvm.IRModule | torch.nn.Module,
    *,
    example_inputs: tuple | None = None,
    params: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    entries: int = 4,
    max_patterns: int = 12,
) -> list[ConvRecord]:
    """What ``compile`` would do with every conv2d of the model, without building anything."""
    patterns = PatternOptions(entries, max_patterns)
    imported = load_model(model, params=params, input_shapes=input_shapes, example_inputs=example_inputs)
    mod = relax.transform.FoldConstant()(imported.mod)
    return conv_report(mod, patterns)
