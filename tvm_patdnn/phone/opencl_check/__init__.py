"""Check the OpenCL kernels compiled for Adreno without a GPU: PoCL runs them on this CPU.

The PyPI TVM runtime has no OpenCL device, so a Relax VM cannot run an ``adreno`` build here.
Instead this module replays what the VM and TVM's host code would do on the phone:

* the Relax ``main`` after our pipeline (memory planned: ``alloc_storage`` / ``alloc_tensor``
  with storage reuse, ``kill_object``, ``vm.builtin.reshape``, calls of PrimFuncs) is walked
  binding by binding, with every storage a PoCL buffer filled with NaN (so a kernel reading
  memory nothing wrote shows up in the result);
* every called PrimFunc is lowered with TVM's own TIR pipeline, and its host function's kernel
  launches (``call_ffi_kernel``: kernel name, buffer arguments, grid and block sizes) are run
  in order with pyopencl, global size = grid x block, local size = block;
* the kernel sources are the ones embedded in the compiled executable; every one of them is
  built with PoCL, launched or not, and work groups are checked against the target's limit.

The outputs are compared with ``onnx.reference``. Needs Debian ``pocl-opencl-icd`` and PyPI
``pyopencl``. ``python -m tvm_patdnn.phone.opencl_check MODEL`` is ``patdnn opencl-check MODEL``
(``__main__.py``: the command line lives above this package, which it imports).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.tirx import stmt as tir_stmt

from ...analysis import PatternOptions
from ...errors import PatDNNError
from ...fileio import load_onnx_model
from ...verify import DEFAULT_RTOL, onnx_reference, relative_error

__all__ = ["OpenCLCheck", "KernelLaunch", "check_opencl", "split_kernel_sources"]

_FUNCTION_MARK = re.compile(r"^// Function: (\S+)\n", re.MULTILINE)
_ARG_DATA = 15  # tvm_struct_get field of a packed argument: its handle (the DLTensor)
_TENSOR_DATA = 1  # tvm_struct_get field of a DLTensor: its data pointer
_THREAD_AXES = {"x": 0, "y": 1, "z": 2}


@dataclass
class KernelLaunch:
    """One kernel launch as the host code issues it."""

    primfunc: str
    kernel: str
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]


@dataclass
class OpenCLCheck:
    """What :func:`check_opencl` built, ran and compared."""

    kernels_built: list[str]
    launches: list[KernelLaunch]
    outputs: list[np.ndarray]
    reference: list[np.ndarray]
    errors: list[float]
    rtol: float
    device: str
    sources: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(e <= self.rtol for e in self.errors)

    def summary(self) -> str:
        verdict = "match" if self.ok else "DIFFER from"
        return (
            f"{len(self.kernels_built)} OpenCL kernels built with {self.device}; "
            f"{len(self.launches)} launches replayed; outputs {verdict} the ONNX reference "
            f"(relative error {', '.join(f'{e:.2e}' for e in self.errors)}; tolerance {self.rtol:g})"
        )


def _pocl():
    """A pyopencl context and queue on PoCL; PatDNNError naming the packages when missing."""
    try:
        import pyopencl as cl
    except ImportError:
        raise PatDNNError("the OpenCL check needs pyopencl (pip install pyopencl) and PoCL "
                          "(apt-get install pocl-opencl-icd)") from None
    try:
        platforms = [p for p in cl.get_platforms() if "Portable Computing Language" in p.name]
    except cl.Error:
        platforms = []
    if not platforms or not platforms[0].get_devices():
        raise PatDNNError("no PoCL OpenCL platform found: apt-get install pocl-opencl-icd")
    device = platforms[0].get_devices()[0]
    context = cl.Context(devices=[device])
    return cl, context, cl.CommandQueue(context), device


def split_kernel_sources(source: str) -> dict[str, str]:
    """TVM's OpenCL module source -> {kernel name: a program defining that kernel}.

    TVM writes one chunk per kernel (``// Function: NAME``, every prototype, one definition);
    each chunk is built as its own program, as the OpenCL runtime on the phone does.
    """
    marks = list(_FUNCTION_MARK.finditer(source))
    prelude = source[: marks[0].start()] if marks else ""
    chunks = {}
    for mark, following in zip(marks, marks[1:] + [None]):
        end = following.start() if following is not None else len(source)
        chunks[mark.group(1)] = prelude + source[mark.end():end]
    return chunks


def _opencl_sources(executable: relax.VMExecutable) -> dict[str, str]:
    pending, sources = [executable.mod], {}
    while pending:
        module = pending.pop()
        if module.kind == "opencl":
            sources.update(split_kernel_sources(module.inspect_source()))
        pending.extend(module.imports)
    return sources


def _host_functions(mod: tvm.IRModule, target: tvm.target.Target) -> dict[str, tirx.PrimFunc]:
    """Lower the PrimFuncs exactly as ``tvm.compile`` does; return the host functions by name."""
    build_module = importlib.import_module("tvm.tirx.build")  # the module, not tvm.tirx.build()
    tir_mod = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)},
                           attrs=mod.attrs)
    tir_mod = tirx.transform.BindTarget(target.with_host(target.host))(tir_mod)
    pipeline, _, _ = tvm.tirx.get_tir_pipeline("default")
    host_mod, _ = build_module.split_host_device_mods(pipeline(tir_mod))
    return {gv.name_hint: f for gv, f in host_mod.functions.items()}


def _find_arg_index(expr) -> int | None:
    """The packed-argument index in ``tvm_struct_get(args, i, 15)`` anywhere inside ``expr``."""
    if isinstance(expr, tvm.ir.expr.Call):
        if expr.op.name == "tirx.tvm_struct_get" and int(expr.args[2]) == _ARG_DATA:
            return int(expr.args[1])
        for arg in expr.args:
            found = _find_arg_index(arg)
            if found is not None:
                return found
    return None


@dataclass
class _Tensor:
    """A tensor in PoCL memory: a buffer (or a view of a storage) with shape and dtype."""

    buffer: object
    shape: tuple[int, ...]
    dtype: np.dtype


class _Replay:
    """Runs a model's Relax main on PoCL, launching kernels as the host code does."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, sources: dict[str, str]) -> None:
        self.cl, self.context, self.queue, self.device = _pocl()
        self.max_threads = int(target.attrs.get("max_num_threads", self.device.max_work_group_size))
        self.mod = mod
        self.hosts = _host_functions(mod, target)
        self.programs = {}
        for name, source in sources.items():
            try:
                self.programs[name] = self.cl.Program(self.context, source).build()
            except self.cl.Error as err:
                raise PatDNNError(f"PoCL rejects OpenCL kernel {name}: {str(err).strip()[-2000:]}") from None
        self.launches: list[KernelLaunch] = []

    # -- device memory -------------------------------------------------------------------

    def _buffer(self, nbytes: int):
        host = np.full(max(nbytes, 4) // 4, np.nan, dtype=np.float32)
        flags = self.cl.mem_flags.READ_WRITE | self.cl.mem_flags.COPY_HOST_PTR
        return self.cl.Buffer(self.context, flags, hostbuf=host)

    def _upload(self, array: np.ndarray):
        flags = self.cl.mem_flags.READ_WRITE | self.cl.mem_flags.COPY_HOST_PTR
        return self.cl.Buffer(self.context, flags, hostbuf=np.ascontiguousarray(array))

    def _download(self, tensor: _Tensor) -> np.ndarray:
        out = np.empty(tensor.shape, dtype=tensor.dtype)
        self.cl.enqueue_copy(self.queue, out, tensor.buffer)
        return out

    # -- Relax level ---------------------------------------------------------------------

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        main = self.mod["main"]
        env = {}
        for param, value in zip(main.params, inputs, strict=True):
            env[param] = _Tensor(self._upload(value), value.shape, value.dtype)
        for block in main.body.blocks:
            for binding in block.bindings:
                env[binding.var] = self._eval(binding.value, env)
        result = self._eval(main.body.body, env)
        self.queue.finish()
        results = result if isinstance(result, tuple) else (result,)
        return [self._download(t) for t in results]

    def _eval(self, expr, env):
        if isinstance(expr, relax.Var):
            return env[expr]
        if isinstance(expr, tvm.ir.expr.Constant):
            array = expr.value.numpy()
            return _Tensor(self._upload(array), array.shape, array.dtype)
        if isinstance(expr, relax.Tuple):
            return tuple(self._eval(field_, env) for field_ in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return self._eval(expr.tuple_value, env)[expr.index]
        if not isinstance(expr, relax.Call):
            raise PatDNNError(f"the OpenCL check cannot replay {type(expr).__name__}: {expr}")
        op = expr.op
        if isinstance(op, tvm.ir.GlobalVar):
            self._call_primfunc(op.name_hint, [self._eval(a, env) for a in expr.args])
            return None
        if isinstance(op, relax.ExternFunc):
            return self._extern(str(op.global_symbol), expr.args, env)
        name = op.name
        if name == "relax.null_value" or name == "relax.vm.kill_object":
            return None  # killing only ends a lifetime: the planned reuse is in alloc_tensor
        if name == "relax.vm.alloc_storage":
            return self._buffer(int(expr.args[0].values[0]))
        if name == "relax.vm.alloc_tensor":
            storage, offset = env[expr.args[0]], int(expr.args[1].value)
            shape = tuple(int(d) for d in expr.args[2].values)
            dtype = np.dtype(str(expr.args[3].value))
            if offset:
                size = int(np.prod(shape)) * dtype.itemsize
                storage = storage.get_sub_region(offset, size)
            return _Tensor(storage, shape, dtype)
        raise PatDNNError(f"the OpenCL check cannot replay Relax operator {name}")

    def _extern(self, symbol: str, args, env):
        if symbol in ("vm.builtin.check_tensor_info", "vm.builtin.match_shape"):
            return None  # shapes are static: the compiler checked them
        if symbol == "vm.builtin.reshape":
            tensor = self._eval(args[0], env)
            return _Tensor(tensor.buffer, tuple(int(d) for d in args[1].values), tensor.dtype)
        raise PatDNNError(f"the OpenCL check cannot replay VM builtin {symbol}")

    # -- host code of one PrimFunc -------------------------------------------------------

    def _call_primfunc(self, name: str, tensors: list) -> None:
        func = self.hosts.get(name)
        if func is None:
            raise PatDNNError(f"no host function {name} in the lowered module")
        # TVM objects are compared with same_as, not hashed: (IR object, value) lists, not dicts.
        binds: list = []
        memory: list = []
        self._walk(func.body, name, tensors, binds, memory)

    def _walk(self, stmt, primfunc: str, tensors: list, binds: list, memory: list) -> None:
        if isinstance(stmt, tir_stmt.SeqStmt):
            for inner in stmt.seq:
                self._walk(inner, primfunc, tensors, binds, memory)
            return
        if isinstance(stmt, tir_stmt.Bind):
            binds.append((stmt.var, stmt.value))
        elif isinstance(stmt, tir_stmt.AllocBuffer):
            buffer = stmt.buffer
            count = int(np.prod([int(d) for d in buffer.shape]))
            memory.append((buffer.data, self._buffer(count * np.dtype(str(buffer.dtype)).itemsize)))
        elif isinstance(stmt, tir_stmt.DeclBuffer):
            backing = self._resolve(stmt.data, tensors, binds, memory)
            memory += [(stmt.buffer.data, backing), (stmt.data, backing)]
        elif isinstance(stmt, tir_stmt.Evaluate) and isinstance(stmt.value, tvm.ir.expr.Call):
            call = stmt.value
            if call.op.name == "tirx.call_ffi_kernel":
                self._launch(primfunc, call, tensors, binds, memory)
        elif isinstance(stmt, tir_stmt.IfThenElse):
            return  # argument checks of the packed API; launches never sit under them
        body = getattr(stmt, "body", None)
        if isinstance(body, tir_stmt.Stmt):
            self._walk(body, primfunc, tensors, binds, memory)

    def _resolve(self, data, tensors: list, binds: list, memory: list):
        """The PoCL buffer behind a pointer expression of the host code."""
        for known, buffer in memory:
            if known.same_as(data) or tvm_ffi.structural_equal(known, data):
                return buffer
        # reinterpret(tvm_struct_get(HANDLE, 0, 1)) with HANDLE bound to packed argument i
        inner = data.args[0] if isinstance(data, tvm.ir.expr.Call) and data.op.name == "tirx.reinterpret" else data
        if isinstance(inner, tvm.ir.expr.Call) and inner.op.name == "tirx.tvm_struct_get" and \
                int(inner.args[2]) == _TENSOR_DATA:
            handle = next((value for var, value in binds if var.same_as(inner.args[0])), None)
            index = _find_arg_index(handle) if handle is not None else None
            if index is not None:
                return tensors[index].buffer
        raise PatDNNError(f"the OpenCL check cannot tell which tensor backs {data}")

    def _launch(self, primfunc: str, call, tensors: list, binds: list, memory: list) -> None:
        kernel_name = str(call.args[0].value)
        tags = [str(t) for t in call.attrs.launch_params] if call.attrs is not None else []
        values = list(call.args[1:])
        launch_values, arg_values = values[len(values) - len(tags):], values[: len(values) - len(tags)]
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, value in zip(tags, launch_values):
            scope, _, axis = tag.partition(".")
            if scope not in ("blockIdx", "threadIdx") or axis not in _THREAD_AXES:
                raise PatDNNError(f"kernel {kernel_name}: launch parameter {tag} is not supported by the check")
            (grid if scope == "blockIdx" else block)[_THREAD_AXES[axis]] = int(value)
        if int(np.prod(block)) > self.max_threads:
            raise PatDNNError(f"kernel {kernel_name} launches work groups of {int(np.prod(block))} items, "
                              f"more than the target's {self.max_threads}")
        args = []
        for value in arg_values:
            if isinstance(value, (tirx.IntImm, tirx.FloatImm)):
                args.append(np.array(value.value, dtype=str(value.dtype))[()])
            else:
                args.append(self._resolve(value, tensors, binds, memory))
        program = self.programs.get(kernel_name)
        if program is None:
            raise PatDNNError(f"the host code launches {kernel_name}, which the OpenCL module does not define")
        kernel = self.cl.Kernel(program, kernel_name)
        kernel.set_args(*args)
        global_size = tuple(g * b for g, b in zip(grid, block))
        self.cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, tuple(block))
        self.launches.append(KernelLaunch(primfunc, kernel_name, global_size, tuple(block)))


def check_opencl(
    model: str | os.PathLike | onnx.ModelProto,
    target: str | dict = "adreno",
    *,
    inputs: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    entries: int = 4,
    max_patterns: int = 12,
    rtol: float = DEFAULT_RTOL,
) -> OpenCLCheck:
    """Compile ``model`` for an OpenCL target and verify every kernel on PoCL (see module doc)."""
    from ...frontend import check_inputs, load_model, seeded_inputs
    from ...pipeline import get_pipeline
    from ...targets import resolve_target

    resolved = resolve_target(target)
    if resolved.kind.name != "opencl":
        raise PatDNNError(f"the OpenCL check needs an OpenCL target such as adreno, not {resolved.kind.name}")
    proto = load_onnx_model(model)
    imported = load_model(proto, input_shapes=input_shapes)
    try:
        with resolved:
            lowered = get_pipeline(resolved, PatternOptions(entries, max_patterns))(imported.mod)
        executable = tvm.compile(lowered, resolved, relax_pipeline=None)
    except PatDNNError:
        raise
    except Exception as err:  # TVM's errors name C++ internals; say which stage failed
        raise PatDNNError(f"TVM failed to compile the model for {resolved}: {str(err).strip().splitlines()[-1]}") from err
    arrays = check_inputs(imported, seeded_inputs(imported) if inputs is None else inputs)
    sources = _opencl_sources(executable)
    replay = _Replay(lowered, resolved, sources)
    outputs = replay.run(arrays)
    reference = onnx_reference(proto, dict(zip(imported.input_names, arrays)))
    errors = [relative_error(a, e) for a, e in zip(outputs, reference, strict=True)]
    return OpenCLCheck(sorted(replay.programs), replay.launches, outputs, reference, errors, rtol,
                       f"PoCL ({replay.device.name})", sources)
