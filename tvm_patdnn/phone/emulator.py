"""A tracker-registered RPC server whose sessions run on an emulated aarch64 phone.

Why: ``tvm.rpc.connect_tracker(...).request("android")`` and meta_schedule's RPCRunner expect
a normal TVM RPC server.  This one speaks the tracker and client handshakes in Python and
hands each accepted connection (the raw socket fd) to a fresh ``qemu-aarch64`` process
running our ``minirpc_server`` on TVM's aarch64 runtime, so every byte of the RPC session is
served by the code a phone would run.  Like a real ``tvm.rpc.Server`` it serves one session
at a time and advertises itself again when the session ends.

Each session's qemu runs in its own process group (so a session is ended by killing its group)
and is asked by the kernel to die with the emulator (``PR_SET_PDEATHSIG``): an emulator killed
without warning takes its live session down, as a phone that is switched off would.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import tvm.rpc
from .. import tvm_compat as protocol
from ..tvm_compat import TrackerCode
from . import runtime

logger = logging.getLogger("tvm_patdnn.phone")

_PING_PERIOD = 2.0  # seconds between tracker polls while idle
_UNUSED_KEY_TIMEOUT = 6.0  # re-advertise if a client took our key but never came
_POLL = 0.25  # how often blocking waits look at the stop flag
_HANDSHAKE_TIMEOUT = 10.0
# Session work directories (here and in minirpc_server.cc): clients recognise the emulator by it.
WORKDIR_PREFIX = "patdnn-phone-"


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGKILL when this process dies (Linux), else None.

    libc is looked up here, in the parent: the child, between fork and exec, only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def popen_session() -> tvm.rpc.RPCSession:
    """One emulated-phone session over pipes, without tracker or sockets (quick checks)."""
    return tvm.rpc.PopenSession(str(runtime.popen_launcher()))


class PhoneEmulator:
    """Serve TVM RPC sessions on qemu-aarch64, registered with a tracker under ``key``.

    ``tracker`` is ``(host, port)`` or None (then clients connect directly with ``key``).
    Binds the first free port in ``[port, port_end)`` on ``host``; see :attr:`port`.
    """

    def __init__(
        self,
        key: str = "android",
        tracker: tuple[str, int] | None = None,
        host: str = "127.0.0.1",
        port: int = 9090,
        port_end: int = 9199,
    ) -> None:
        self.key = key
        self.tracker = tracker
        self.host = host
        self._server_cmd = runtime.server_command()  # checks tools, builds server up front
        self._stop = threading.Event()
        self._tracker_sock: socket.socket | None = None
        self._matchkey = key
        self._sock = socket.socket(protocol.address_family((host, port)), socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = self._bind(host, port, port_end)
        self._sock.listen(1)

    def _bind(self, host: str, port: int, port_end: int) -> int:
        for candidate in range(port, max(port_end, port + 1)):
            try:
                self._sock.bind((host, candidate))
                return candidate
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
        self._sock.close()
        raise OSError(f"no free port in [{port}, {port_end}) on {host}")

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return; safe from signal handlers and other threads."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Advertise, accept and serve sessions until :meth:`stop`; then release everything."""
        retry = 0
        try:
            while not self._stop.is_set():
                try:
                    if self.tracker is not None and self._tracker_sock is None:
                        self._register()
                        retry = 0
                    accepted = self._wait_for_client()
                except OSError as err:
                    if retry == 0:
                        logger.warning("no tracker connection (%s); retrying quietly", err)
                    self._drop_tracker()
                    self._stop.wait(min(1.0 + retry, 5.0))
                    retry += 1
                    continue
                if accepted is not None:
                    self._serve_session(*accepted)
        finally:
            self._drop_tracker()
            self._sock.close()

    # -- tracker side ----------------------------------------------------------------------

    def _register(self) -> None:
        assert self.tracker is not None
        sock = socket.create_connection(self.tracker, timeout=5.0)
        try:
            sock.sendall(struct.pack("<i", protocol.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", protocol.recvall(sock, 4))[0] != protocol.RPC_TRACKER_MAGIC:
                raise OSError(f"{self.tracker} is not a TVM RPC tracker")
            # The "key" entry also makes the tracker drop our offers when we disconnect.
            info = {"key": "server:" + self.key, "addr": [self.host, self.port]}
            protocol.sendjson(sock, [TrackerCode.UPDATE_INFO, info])
            if protocol.recvjson(sock) != TrackerCode.SUCCESS:
                raise OSError("tracker refused UPDATE_INFO")
        except BaseException:
            sock.close()
            raise
        self._tracker_sock = sock
        self._advertise()
        logger.info("registered key %r at tracker %s:%d", self.key, *self.tracker)

    def _advertise(self) -> None:
        """Offer ourselves to the tracker under a fresh match key (one client per key)."""
        if self._tracker_sock is None:
            return
        self._matchkey = protocol.random_key(self.key)
        protocol.sendjson(
            self._tracker_sock, [TrackerCode.PUT, self.key, (self.port, self._matchkey), None]
        )
        if protocol.recvjson(self._tracker_sock) != TrackerCode.SUCCESS:
            raise OSError("tracker refused PUT")

    def _drop_tracker(self) -> None:
        if self._tracker_sock is not None:
            self._tracker_sock.close()
            self._tracker_sock = None

    def _key_still_pending(self) -> bool:
        assert self._tracker_sock is not None
        protocol.sendjson(self._tracker_sock, [TrackerCode.GET_PENDING_MATCHKEYS])
        return self._matchkey in protocol.recvjson(self._tracker_sock)

    # -- client side -----------------------------------------------------------------------

    def _wait_for_client(self) -> tuple[socket.socket, float | None] | None:
        """Accept one client whose handshake matches; None when stopping or re-advertising."""
        last_ping = time.monotonic()
        taken_since: float | None = None
        while not self._stop.is_set():
            readable, _, _ = select.select([self._sock], [], [], _POLL)
            if readable:
                conn, addr = self._sock.accept()
                options = self._handshake(conn, addr)
                if options is not None:
                    return conn, _session_timeout(options)
                continue
            now = time.monotonic()
            if self._tracker_sock is None or now - last_ping < _PING_PERIOD:
                continue
            last_ping = now
            if self._key_still_pending():
                taken_since = None
            elif taken_since is None:
                taken_since = now
            elif now - taken_since > _UNUSED_KEY_TIMEOUT:
                logger.info("match key handed out but unused; advertising again")
                self._advertise()
                taken_since = None
        return None

    def _handshake(self, conn: socket.socket, addr: tuple) -> list[str] | None:
        """Check the client's magic and key; return its options, or None after rejecting."""
        try:
            conn.settimeout(_HANDSHAKE_TIMEOUT)
            if struct.unpack("<i", protocol.recvall(conn, 4))[0] != protocol.RPC_MAGIC:
                conn.close()
                return None
            keylen = struct.unpack("<i", protocol.recvall(conn, 4))[0]
            words = protocol.recvall(conn, keylen).decode("utf-8").split()
            if not words or words[0] != "client:" + self._matchkey:
                logger.warning("rejecting %s: key %r does not match", addr, words[:1])
                conn.sendall(struct.pack("<i", protocol.RPC_CODE_MISMATCH))
                conn.close()
                return None
            server_key = ("server:" + self.key).encode("utf-8")
            conn.sendall(struct.pack("<ii", protocol.RPC_CODE_SUCCESS, len(server_key)) + server_key)
            conn.setblocking(True)  # the fd goes to qemu, which expects blocking I/O
        except (OSError, struct.error, UnicodeDecodeError) as err:
            logger.warning("handshake with %s failed: %s", addr, err)
            conn.close()
            return None
        return words[1:]

    def _serve_session(self, conn: socket.socket, timeout: float | None) -> None:
        """Run one RPC session in a fresh qemu process that owns the client socket."""
        workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
        fd = conn.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        logger.info("session started (timeout %s s), workdir %s", timeout, workdir)
        proc = subprocess.Popen(
            [*self._server_cmd, workdir, str(fd), str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: we kill the whole group
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 (only prctl runs) and it dies with us, however we die
        )
        try:
            while proc.poll() is None:
                if self._stop.is_set():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    self._kill(proc)
                    protocol.return_exception(
                        fd,
                        f"RPCSessionTimeoutError: Your {timeout}s session has expired, "
                        'try to increase the "session_timeout" value.',
                    )
                    break
                try:
                    proc.wait(_POLL)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._kill(proc)
            conn.close()
            shutil.rmtree(workdir, ignore_errors=True)
        logger.info("session ended (exit code %s)", proc.returncode)
        if not self._stop.is_set():
            try:
                self._advertise()
            except OSError:
                self._drop_tracker()  # serve_forever reconnects and re-registers

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def _session_timeout(options: list[str]) -> float | None:
    """The client's ``-timeout=SECONDS`` option (0 or absent: no limit)."""
    for option in options:
        if option.startswith("-timeout="):
            try:
                return float(option[len("-timeout="):]) or None
            except ValueError:
                logger.warning("ignoring malformed client option %r", option)
    return None
