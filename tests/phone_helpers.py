"""The emulated phone as the phone tests use it: a real RPC tracker and ``patdnn phone-emulator``
processes on 127.0.0.1 (fixtures in conftest.py; these helpers import as a plain module)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from tvm import rpc

from tvm_patdnn.phone import runtime

HOST = "127.0.0.1"
# The subcommand exactly as the project CLI wires it: parser -> add_phone_emulator_command.
EMULATOR_MAIN = """
import argparse, sys
from tvm_patdnn.phone.commands import add_phone_emulator_command
parser = argparse.ArgumentParser()
add_phone_emulator_command(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def missing_tools() -> str | None:
    """Why the emulated phone cannot run here, or None."""
    if shutil.which(runtime.QEMU) is None or shutil.which(runtime.CROSS_CXX) is None:
        return ("emulated phone needs qemu-aarch64 and aarch64-linux-gnu-g++ "
                "(apt-get install qemu-user g++-aarch64-linux-gnu)")
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, period: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(period)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    """Signal the process group and wait; SIGKILL the group if it does not go."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def free_devices(tracker_port: int, key: str) -> int:
    queue = rpc.connect_tracker(HOST, tracker_port).summary()["queue_info"]
    return queue.get(key, {}).get("free", 0)


def listening_addresses(pid: int) -> set[str]:
    """The addresses a process listens on (TCP)."""
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class EmulatedPhone:
    """``patdnn phone-emulator`` in its own process group, registered under ``key``.

    ``host`` None starts it without ``--host`` (its default). The emulator runs each RPC
    session in a qemu process with a process group of its own; :meth:`kill` kills all of them.
    """

    def __init__(self, tracker_port: int, key: str, log: Path, host: str | None = HOST) -> None:
        self.tracker_port, self.key, self.log = tracker_port, key, log
        args = [sys.executable, "-c", EMULATOR_MAIN, "phone-emulator", "--tracker", f"{HOST}:{tracker_port}",
                "--key", key, "--port", str(free_port())]
        if host is not None:
            args += ["--host", host]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            stop_group(self.proc)
            raise RuntimeError(f"phone-emulator did not start: {line!r}\n{log.read_text()}")
        self.port = int(line.split()[3].rstrip(",").rsplit(":", 1)[1])
        wait_until(lambda: free_devices(tracker_port, key) >= 1, 30, f"key {key} at the tracker")

    @property
    def tracker(self) -> str:
        """``host:port`` of the tracker it is registered with."""
        return f"{HOST}:{self.tracker_port}"

    @property
    def rpc(self) -> str:
        """``host:port:key``, as ``tune(rpc=...)`` and ``patdnn tune --rpc`` take it."""
        return f"{self.tracker}:{self.key}"

    def processes(self) -> list[psutil.Process]:
        """The emulator and everything it started (its qemu sessions)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sessions(self) -> list[psutil.Process]:
        """Live qemu session processes."""
        found = []
        for process in self.processes()[1:]:
            try:
                if "qemu" in process.name() and alive(process):
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
        return found

    def uploaded(self) -> list[str]:
        """Files uploaded into the live sessions' work directories (a candidate being run)."""
        return _uploaded(self.sessions())

    def hold(self) -> list[str]:
        """Freeze the phone (SIGSTOP: the emulator, so that no session starts, then its live
        sessions) if a session holds an uploaded file, and return those files; else leave it
        running and return []. meta_schedule's runner removes its candidate from the device before
        it returns the time, so a candidate in a frozen session is a measurement in flight, which
        :meth:`kill` then loses for certain."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        sessions = self.sessions()
        for process in sessions:
            _signal(process, signal.SIGSTOP)
        wait_until(lambda: all(_stopped(process) for process in sessions), 10, "the sessions to stop", period=0.001)
        held = _uploaded(sessions)
        if not held:
            for process in sessions:
                _signal(process, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGCONT)
        return held

    def stop(self) -> int:
        """SIGTERM, as a user stops it: ends the live session, exits 0."""
        return stop_group(self.proc)

    def kill(self) -> list[psutil.Process]:
        """Switch the phone off: SIGKILL the emulator and every process group it spawned.

        The emulator is frozen first so that it cannot start another session between the
        look-up of its children and the kill. Returns the processes killed (all gone by then).
        """
        if self.proc.poll() is not None:
            return []
        os.kill(self.proc.pid, signal.SIGSTOP)
        victims = self.processes()
        groups = {self.proc.pid}
        for process in victims:
            try:
                groups.add(os.getpgid(process.pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgrp())  # never the test's own group
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        _, left = psutil.wait_procs(victims, timeout=10)
        assert not [p for p in left if alive(p)], f"still running after SIGKILL: {left}"
        return victims


def _uploaded(sessions: list[psutil.Process]) -> list[str]:
    found = []
    for process in sessions:
        try:
            workdir = process.cmdline()[-3]  # qemu -L SYSROOT SERVER WORKDIR READ_FD WRITE_FD
            found += [os.path.join(workdir, name) for name in os.listdir(workdir)]
        except (psutil.Error, OSError, IndexError):
            pass  # the session ended meanwhile
    return found


def _stopped(process: psutil.Process) -> bool:
    """Stopped by a signal, or gone."""
    try:
        return process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _signal(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass  # the session ended meanwhile
