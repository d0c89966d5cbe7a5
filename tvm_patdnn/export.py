"""Exporting compiled code as a shared library the target's CPU can load, and checking what was written.

Used by every export: ``CompiledModel.export_library`` (compile, deploy) and the tuner's
candidate libraries.

TVM's default ``export_library`` links with the host's ``g++``, which silently produces an
x86 library (or fails obscurely) for aarch64 code; a phone only says "dlopen failed" later.
So aarch64 targets are linked with the Android NDK (``TVM_NDK_CC``, what a real phone needs:
Bionic libc) or else Debian's ``aarch64-linux-gnu-g++`` (glibc: aarch64 Linux boards and the
emulated phone), and the ELF machine type of every written library is checked. Linking an
Android target without the NDK still works (the emulated phone runs such a library) but warns,
because a real phone's loader rejects a glibc library.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import tvm
from tvm.support import cc, ndk

from .errors import PatDNNError
from .targets import is_aarch64, target_arch

__all__ = ["DEBIAN_CROSS_CXX", "ELF_MACHINES", "NDK_ENV", "export_checked", "linker_for", "check_library_machine",
           "elf_machine", "machine_name"]

DEBIAN_CROSS_CXX = "aarch64-linux-gnu-g++"
NDK_ENV = "TVM_NDK_CC"

# ELF e_machine values of the architectures TVM's LLVM backend targets here.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm64": 183, "i386": 3, "i686": 3, "riscv64": 243}
_EM_NAMES = {62: "x86-64", 183: "AArch64", 3: "x86", 243: "RISC-V", 40: "ARM (32-bit)"}


def linker_for(target: tvm.target.Target) -> Callable | None:
    """The ``fcompile`` for ``export_library``: None (TVM's host default) unless aarch64."""
    if not is_aarch64(target):
        return None
    ndk_cc = os.environ.get(NDK_ENV)
    if ndk_cc:
        if shutil.which(ndk_cc) is None:
            raise PatDNNError(f"{NDK_ENV}={ndk_cc} is not an executable compiler (point it at the NDK's "
                              "aarch64-linux-android<API>-clang++)")
        return ndk.create_shared  # reads TVM_NDK_CC when called
    if shutil.which(DEBIAN_CROSS_CXX) is None:
        raise PatDNNError(
            f"exporting for aarch64 needs a cross linker: set {NDK_ENV} to the Android NDK's "
            f"aarch64-linux-android<API>-clang++, or apt-get install g++-aarch64-linux-gnu "
            f"(provides {DEBIAN_CROSS_CXX})"
        )
    if "android" in str(target.attrs.get("mtriple", "") or (target.host and target.host.attrs.get("mtriple", ""))):
        warnings.warn(
            f"{NDK_ENV} is not set: linking this Android target with {DEBIAN_CROSS_CXX} gives a glibc library, "
            f"which the emulated phone and aarch64 Linux boards load but an Android phone does not; set {NDK_ENV} "
            "to the NDK's aarch64-linux-android<API>-clang++ for a phone, or use --target arm_cpu-linux "
            "(target='arm_cpu-linux') for Linux", UserWarning, stacklevel=2)
    return cc.cross_compiler(DEBIAN_CROSS_CXX)


def elf_machine(path: str | os.PathLike) -> int | None:
    """The ELF e_machine of a file, or None when it is not ELF."""
    with open(path, "rb") as handle:
        header = handle.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def machine_name(machine: int) -> str:
    """An ELF e_machine as a CPU architecture name ("x86-64", "AArch64", ...)."""
    return _EM_NAMES.get(machine, f"e_machine {machine}")


def check_library_machine(path: str | os.PathLike, target: tvm.target.Target,
                          remedy: str = "the wrong linker was used") -> None:
    """Raise PatDNNError unless the shared library at ``path`` is an ELF for the target's CPU;
    ``remedy`` ends the message (the caller knows why the two could differ)."""
    expected = ELF_MACHINES.get(target_arch(target))
    if Path(path).suffix != ".so" or expected is None:
        return  # .tar/.o artifacts and unknown architectures: nothing to compare with
    machine = elf_machine(path)
    if machine is None:
        raise PatDNNError(f"the library {path} is not an ELF file")
    if machine != expected:
        raise PatDNNError(
            f"the library {path} is an {machine_name(machine)} ELF but target {target} needs "
            f"{machine_name(expected)}: {remedy}"
        )


def export_checked(executable: tvm.runtime.Module, path: str, target: tvm.target.Target, **kwargs) -> None:
    """``executable.export_library(path)`` with the right linker for ``target``, then the ELF check."""
    if "fcompile" not in kwargs:
        kwargs["fcompile"] = linker_for(target)
    try:
        executable.export_library(path, **kwargs)
    except RuntimeError as err:  # the linker's own message (missing symbols, bad flags, ...)
        raise PatDNNError(f"linking the library for {target} failed: {str(err).strip()}") from err
    check_library_machine(path, target)
