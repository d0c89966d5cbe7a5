"""The phone subcommands: ``patdnn deploy`` (run, check and time on a device behind an RPC
tracker), ``patdnn phone-emulator`` (the emulated aarch64 phone behind a tracker) and ``patdnn
opencl-check`` (the Adreno kernels verified on PoCL). Handlers import their modules when they run."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys

from ..arguments import TARGET_HELP, add_model_options, add_target_option, add_threads_option, pattern_options
from ..errors import PatDNNError
from ..verify import DEFAULT_RTOL

__all__ = ["add_deploy_command", "add_opencl_check_command", "add_phone_emulator_command"]

EXPOSED_WARNING = (
    "WARNING: --host {host} is not a loopback address: anyone who can reach {host}:{port} can run "
    "any code as this user (qemu-user is no sandbox, and TVM RPC has no authentication). Bind "
    "127.0.0.1 unless the network is yours alone."
)


def _parse_addr(text: str) -> tuple[str, int]:
    from ..rpc import parse_address

    try:
        return parse_address(text)
    except PatDNNError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _first_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535 - 100:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65435 (ports PORT..PORT+100 are tried), got {text!r}")
    return int(text)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def add_deploy_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``patdnn deploy`` (exit status 0: outputs match, 1: they differ, 2: error)."""
    parser = subparsers.add_parser(
        "deploy",
        help="compile (or take a .so), run on a device behind a TVM RPC tracker, check and time it",
        description=(
            "Upload the compiled model to a device registered under KEY at a TVM RPC tracker "
            "(a phone running the TVM RPC app, or `patdnn phone-emulator`), run it, compare its "
            "outputs with onnx.reference (exit status 1 when they differ) and print the latency "
            "measured on the device."
        ),
    )
    add_model_options(parser)
    add_target_option(parser, "arm_cpu", TARGET_HELP + "; arm_cpu and galaxy-s10 are Android phones (link with "
                      "TVM_NDK_CC), arm_cpu-linux aarch64 Linux and the emulated phone")
    parser.add_argument("--tracker", required=True, metavar="HOST:PORT", help="RPC tracker, e.g. 127.0.0.1:9190")
    parser.add_argument("--key", default="android", help="device key at the tracker")
    compiled = parser.add_mutually_exclusive_group()
    compiled.add_argument("--so", metavar="LIBRARY", help="an already compiled library of MODEL (skip compiling)")
    compiled.add_argument("--tuning-db", metavar="DIR",
                          help="compile with the records of `patdnn tune --db DIR` (tuned on this device with --rpc); "
                               "default: the schedules shipped for the target")
    add_threads_option(parser, "run the model with N TVM runtime threads on the device and compile it for N "
                               "(records tuned with `tune --threads N` apply); default: the device's own count "
                               "and the target's num-cores")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help="max error relative to the largest reference output")
    parser.add_argument("--number", type=int, default=5, help="runs averaged per timing")
    parser.add_argument("--repeat", type=int, default=3, help="timings taken")
    parser.add_argument("--session-timeout", type=float, default=600,
                        help="seconds the device serves this session at most; upload, run and timing must "
                             "finish within it")
    parser.add_argument("--timeout", type=float, default=60, metavar="SECONDS",
                        help="limit of every step before the session: the tracker's answer, the device "
                             "becoming free, its handshake")
    parser.set_defaults(func=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    from .deploy import deploy

    patterns = pattern_options(args)
    result = deploy(
        args.model, args.target, tracker=args.tracker, key=args.key, library=args.so,
        input_shapes=dict(args.input_shape), entries=patterns.entries, max_patterns=patterns.max_patterns,
        tuning_db=args.tuning_db, threads=args.threads, rtol=args.rtol, number=args.number, repeat=args.repeat,
        session_timeout=args.session_timeout, timeout=args.timeout,
    )
    print(result.summary())
    return 0 if result.ok else 1


def add_phone_emulator_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``phone-emulator`` subcommand (handler in ``func``)."""
    parser = subparsers.add_parser(
        "phone-emulator",
        help="serve an emulated aarch64 phone (qemu-user) to a TVM RPC tracker",
        description=(
            "Register an emulated aarch64 phone with a TVM RPC tracker. Each RPC session runs "
            "TVM's aarch64 runtime in a fresh qemu-aarch64 process, so "
            "rpc.connect_tracker(...).request(KEY) and meta_schedule's RPCRunner see a normal "
            "device. Needs Debian qemu-user and g++-aarch64-linux-gnu; downloads the aarch64 "
            "TVM runtime wheels once. Timings are 20-50x slower than a real phone."
        ),
    )
    parser.add_argument("--tracker", type=_parse_addr, required=True, metavar="HOST:PORT",
                        help="RPC tracker address, e.g. 127.0.0.1:9190")
    parser.add_argument("--key", default="android", help="device key clients request")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_first_port, default=9090, metavar="PORT",
                        help="first port to try; the next free one up to port+100 is used")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only fetch the aarch64 runtime and build the server, then exit")
    parser.set_defaults(func=run_phone_emulator)


def add_opencl_check_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``patdnn opencl-check`` (exit status 0: the kernels match, 1: they differ, 2: error)."""
    parser = subparsers.add_parser(
        "opencl-check",
        help="compile for an OpenCL target (adreno) and verify every kernel on this CPU with PoCL",
        description=(
            "Compile MODEL for an OpenCL target, build every generated OpenCL kernel with PoCL (CPU OpenCL) and "
            "replay the kernel launches the phone would make, then compare the outputs with onnx.reference. "
            "Needs Debian pocl-opencl-icd and the `opencl` extra (pyopencl). Exit status 1 when the outputs differ."
        ),
    )
    add_model_options(parser)
    add_target_option(parser, "adreno", "an OpenCL target: adreno or a TVM target JSON of kind opencl")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="tolerance relative to the largest output")
    parser.add_argument("--launches", action="store_true", help="list every kernel launch")
    parser.set_defaults(func=run_opencl_check)


def run_opencl_check(args: argparse.Namespace) -> int:
    from .opencl_check import check_opencl

    patterns = pattern_options(args)
    result = check_opencl(args.model, args.target, input_shapes=dict(args.input_shape), entries=patterns.entries,
                          max_patterns=patterns.max_patterns, rtol=args.rtol)
    if args.launches:
        for launch in result.launches:
            print(f"{launch.kernel}: global {launch.global_size}, local {launch.local_size}")
    print(result.summary())
    return 0 if result.ok else 1


def run_phone_emulator(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; those end the current session and exit cleanly."""
    from . import runtime
    from .emulator import PhoneEmulator

    runtime.check_tools()
    runtime.fetch_aarch64_runtime()
    if args.prepare_only:
        print(f"phone RPC server ready: {runtime.build_server()}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        emulator = PhoneEmulator(key=args.key, tracker=args.tracker, host=args.host,
                                 port=args.port, port_end=args.port + 100)
    except OSError as err:
        raise PatDNNError(f"cannot listen on {args.host}:{args.port}: {err}") from err
    if not _is_loopback(args.host):
        print(EXPOSED_WARNING.format(host=args.host, port=emulator.port), file=sys.stderr, flush=True)
    previous = {sig: signal.signal(sig, lambda *_: emulator.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    # The "listening" line tells scripts (and tests) which port was taken and that we are up.
    print(f"phone-emulator listening on {args.host}:{emulator.port}, key {args.key!r}, "
          f"tracker {args.tracker[0]}:{args.tracker[1]}", flush=True)
    try:
        emulator.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("phone-emulator stopped", file=sys.stderr)
    return 0
