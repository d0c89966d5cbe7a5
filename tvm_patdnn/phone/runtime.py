"""The aarch64 TVM runtime and our RPC server binary for the emulated phone.

No phone is attached to CI, so phone deployment is proven on qemu-user running the very
runtime a phone would run: ``libtvm_runtime.so`` & co. from the aarch64 manylinux wheels of
the apache-tvm / apache-tvm-ffi versions installed on the host (the RPC protocol must match).
:func:`fetch_aarch64_runtime` downloads them once into a per-user cache; setup/CI calls it
(``python -m tvm_patdnn.phone.runtime``) so that tests never touch the network.
:func:`build_server` cross-compiles ``minirpc_server.cc`` against that runtime.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import PatDNNError
from ..export import DEBIAN_CROSS_CXX as CROSS_CXX
from ..export import ELF_MACHINES, elf_machine

QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")

# Members taken from the wheels; nothing else of the (≈95 MB) wheels is kept.
_TVM_LIBS = ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_extra.so")
_FFI_LIBS = ("tvm_ffi/lib/libtvm_ffi.so",)
_FFI_HEADER_PREFIXES = ("tvm_ffi/include/tvm/ffi/", "tvm_ffi/include/dlpack/")
_REQUIRED_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
_AARCH64_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
_SERVER_SOURCE = Path(__file__).with_name("minirpc_server.cc")


def check_tools() -> None:
    """Fail early, naming the Debian package, when the emulation toolchain is missing."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (Debian package qemu-user)")
    if shutil.which(CROSS_CXX) is None:
        missing.append(f"{CROSS_CXX} (Debian package g++-aarch64-linux-gnu)")
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        missing.append(f"the aarch64 C library in {SYSROOT} (Debian package libc6-arm64-cross)")
    if missing:
        raise PatDNNError(
            "the emulated phone needs " + ", ".join(missing)
            + "; install with: apt-get install qemu-user g++-aarch64-linux-gnu"
        )


def _versions() -> tuple[str, str]:
    return (importlib.metadata.version("apache-tvm"), importlib.metadata.version("apache-tvm-ffi"))


def cache_dir() -> Path:
    """Per-user, per-TVM-version cache directory for the aarch64 runtime and server."""
    root = os.environ.get("TVM_PATDNN_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvm_patdnn"
    tvm_version, ffi_version = _versions()
    return base / "phone" / f"tvm-{tvm_version}_ffi-{ffi_version}"


def runtime_is_cached() -> bool:
    """True when the aarch64 runtime libraries and headers are already in the cache."""
    root = cache_dir()
    return all((root / "lib" / name).is_file() for name in _REQUIRED_LIBS) and (
        root / "include" / "tvm" / "ffi" / "function.h"
    ).is_file()


def _download_wheel(requirement: str, dest: Path) -> Path:
    platforms = [arg for platform in _AARCH64_PLATFORMS for arg in ("--platform", platform)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           *platforms, "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
           "--dest", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*aarch64*.whl"))
    name = requirement.split("==")[0].replace("-", "_")
    wheels = [w for w in wheels if w.name.startswith(name + "-")]
    if result.returncode != 0 or not wheels:
        raise PatDNNError(
            f"could not download the aarch64 wheel of {requirement} with pip:\n"
            + (result.stderr.strip() or result.stdout.strip())
        )
    return wheels[0]


def _extract(wheel: Path, members: tuple[str, ...], prefixes: tuple[str, ...], root: Path) -> None:
    """Copy chosen wheel members into root/lib (libraries) and root/include (headers)."""
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith("/"):
                continue
            if name in members:
                target = root / "lib" / Path(name).name
            else:
                prefix = next((p for p in prefixes if name.startswith(p)), None)
                if prefix is None:
                    continue
                target = root / "include" / name[len("tvm_ffi/include/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if name in members:
                target.chmod(0o755)


def fetch_aarch64_runtime(force: bool = False) -> Path:
    """Download (once) the aarch64 TVM runtime matching the installed TVM; return its dir.

    Called by setup/CI so that tests and users find everything in the cache offline.
    """
    root = cache_dir()
    if runtime_is_cached() and not force:
        return root
    tvm_version, ffi_version = _versions()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        with tempfile.TemporaryDirectory() as wheels:
            tvm_wheel = _download_wheel(f"apache-tvm=={tvm_version}", Path(wheels))
            ffi_wheel = _download_wheel(f"apache-tvm-ffi=={ffi_version}", Path(wheels))
            _extract(tvm_wheel, _TVM_LIBS, (), staging)
            _extract(ffi_wheel, _FFI_LIBS, _FFI_HEADER_PREFIXES, staging)
        for lib in (staging / "lib").iterdir():
            if elf_machine(lib) != ELF_MACHINES["aarch64"]:
                raise PatDNNError(f"{lib.name} from the downloaded wheel is not an AArch64 ELF")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def build_server() -> Path:
    """Cross-compile the phone RPC server (cached by source hash); return the binary path.

    The binary carries an rpath to the cached runtime, so qemu needs no LD_LIBRARY_PATH.
    """
    check_tools()
    root = cache_dir()
    if not runtime_is_cached():
        raise PatDNNError(
            "the aarch64 TVM runtime is not cached yet; run "
            "`python -m tvm_patdnn.phone.runtime` (downloads the aarch64 wheels once)"
        )
    source = _SERVER_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    binary = root / "bin" / f"minirpc_server-{digest}"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    libs = ["-ltvm_runtime", "-ltvm_ffi"]
    if (root / "lib" / "libtvm_runtime_extra.so").is_file():
        libs.insert(0, "-ltvm_runtime_extra")  # contrib.random etc., used by RPCRunner
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    cmd = [CROSS_CXX, "-std=c++17", "-O2", "-I", str(root / "include"), str(_SERVER_SOURCE),
           "-o", str(partial), "-L", str(root / "lib"), "-Wl,--no-as-needed", *libs,
           "-Wl,-rpath,$ORIGIN/../lib"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise PatDNNError(f"cross-compiling the phone RPC server failed:\n{result.stderr}")
    os.replace(partial, binary)  # atomic: concurrent builders never see a half-written file
    for stale in binary.parent.glob("minirpc_server-*"):
        if not stale.name.startswith(binary.name):  # builds of older server sources
            stale.unlink(missing_ok=True)
    return binary


def server_command() -> list[str]:
    """The host command that starts one aarch64 RPC server (append [WORKDIR] READ_FD WRITE_FD)."""
    return [QEMU, "-L", str(SYSROOT), str(build_server())]


def popen_launcher() -> Path:
    """An executable for ``tvm.rpc.PopenSession``: one emulated-phone session, no tracker.

    PopenSession wants a single executable path, so this writes a tiny exec wrapper around
    :func:`server_command` next to the server binary.
    """
    cmd = server_command()
    script = Path(cmd[-1]).with_name(Path(cmd[-1]).name + ".sh")
    if not script.is_file():
        partial = script.with_name(f"{script.name}.{os.getpid()}.tmp")
        quoted = " ".join(shlex.quote(part) for part in cmd)
        partial.write_text(f'#!/bin/sh\nexec {quoted} "$@"\n')
        partial.chmod(0o755)
        os.replace(partial, script)
    return script


def main() -> int:
    """Setup/CI entry point: fetch the aarch64 runtime and build the server, offline after."""
    try:
        root = fetch_aarch64_runtime()
        binary = build_server()
    except PatDNNError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"aarch64 TVM runtime: {root / 'lib'}\nphone RPC server: {binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
