"""Talking to a TVM RPC tracker with a deadline on every step: addresses, checks, sessions.

TVM's own tracker client and device handshake block in C++ without a time limit: a tracker
address that happens to run another service, a phone that was unplugged or hangs, and
``tracker.request(key)`` or ``rpc.connect`` never return. Deploying (``phone.deploy``), tuning
(``tuning.tuner``) and the phone farm (``tuning.farm``) all reach devices through this module,
which speaks the tracker protocol itself (``tvm_compat``) with socket timeouts and runs the
device handshake under :func:`call_with_deadline`. Every way of not getting a session raises a
RuntimeError starting with :data:`DEVICE_UNAVAILABLE`, which the tuner takes as "stop".
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PatDNNError
from .tvm_compat import TrackerCode, recvjson, sendjson, tracker_handshake

__all__ = ["DEVICE_UNAVAILABLE", "TrackerSession", "call_with_deadline", "check_tracker", "parse_address",
           "parse_rpc", "request_session", "tracker_devices"]

# Starts the error of a measurement that never reached the device (no session): the tuner ends
# the tune on it instead of waiting again for every remaining candidate.
DEVICE_UNAVAILABLE = "device unavailable"


def parse_address(text: str, *, with_key: bool = False) -> tuple[str, int] | tuple[str, int, str]:
    """``HOST:PORT`` -> (host, port); with ``with_key``, ``HOST:PORT:KEY`` -> (host, port, key).
    A port is 1..65535; the host may itself contain colons (IPv6) when there is no key."""
    parts = text.rsplit(":", 2 if with_key else 1)
    host, port = parts[:2] if len(parts) > 1 else ("", "")
    key = parts[2] if with_key and len(parts) == 3 else ""
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or (with_key and (not key or ":" in host)):
        if with_key:
            raise PatDNNError(f"--rpc expects TRACKER_HOST:PORT:DEVICE_KEY (e.g. 127.0.0.1:9190:android), got {text!r}")
        raise PatDNNError(f"tracker address must be HOST:PORT with a port in 1..65535, got {text!r}")
    return (host, int(port), key) if with_key else (host, int(port))


def parse_rpc(text: str, session_timeout: float = 120):
    """``host:port:key`` (an RPC tracker and the device key) as meta_schedule's ``RPCConfig``; the
    device ends a session after ``session_timeout`` seconds."""
    from tvm.s_tir import meta_schedule as ms

    host, port, key = parse_address(text, with_key=True)
    return ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_priority=1,
                               session_timeout_sec=session_timeout)


def call_with_deadline(call: Callable, seconds: float, what: str):
    """``call()``, or TimeoutError naming ``what`` once ``seconds`` have passed without an answer.

    TVM's RPC handshakes and remote calls block in C++ without a time limit, so the call runs in
    a daemon thread; one that never returns is abandoned (it ends with the process)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"patdnn: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"{what} did not answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _tracker_call(host: str, port: int, request: list, timeout: float):
    """One request to an RPC tracker over a fresh connection, every step within ``timeout``."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        tracker_handshake(sock, f"{host}:{port}")
        sendjson(sock, request)
        return recvjson(sock)


def _tracker_summary(host: str, port: int, timeout: float) -> dict:
    try:
        reply = _tracker_call(host, port, [TrackerCode.SUMMARY], timeout)
    except TimeoutError:
        raise RuntimeError(f"no TVM RPC tracker answers at {host}:{port} within {timeout:g} s") from None
    except (OSError, RuntimeError, struct.error, ValueError) as err:
        raise RuntimeError(f"no TVM RPC tracker answers at {host}:{port}: {err}") from None
    if not isinstance(reply, list) or reply[0] != TrackerCode.SUCCESS or not isinstance(reply[1], dict):
        raise RuntimeError(f"{host}:{port} does not answer like a TVM RPC tracker: {reply!r}")
    return reply[1]


def _server_key(server: dict) -> str:
    """The device key of a tracker summary's server entry (servers register as ``server:KEY``)."""
    return str(server.get("key", "")).split(":")[-1]


def tracker_devices(host: str, port: int, key: str, timeout: float) -> list[str]:
    """``host:port`` of every device (RPC server) registered under ``key``, free or busy."""
    servers = _tracker_summary(host, port, timeout).get("server_info", [])
    return sorted(f"{s['addr'][0]}:{s['addr'][1]}" for s in servers
                  if _server_key(s) == key and len(s.get("addr") or ()) == 2)


def check_tracker(host: str, port: int, key: str, timeout: float) -> None:
    """RuntimeError in plain words unless a tracker answers at ``host:port`` within ``timeout``
    and has a device under ``key`` (registered, or already asked for by another client)."""
    summary = _tracker_summary(host, port, timeout)
    keys = {_server_key(server) for server in summary.get("server_info", [])}
    keys = (keys | set(summary.get("queue_info", {}))) - {""}
    if key not in keys:
        raise RuntimeError(
            f"no device registered under key {key!r} at tracker {host}:{port} "
            f"(registered keys: {', '.join(sorted(keys)) or 'none'}); start one with "
            f"`patdnn phone-emulator --tracker {host}:{port} --key {key}` or the TVM RPC app"
        )


def request_session(host: str, port: int, key: str, *, wait: float, session_timeout: float, priority: int = 1):
    """A session on a device of ``key`` at the tracker ``host:port``, waiting at most ``wait`` s.

    TVM's ``TrackerSession.request`` blocks until the tracker hands out a device under the key,
    which with the device gone (killed, unplugged) is never. This sends the same REQUEST but
    gives up after ``wait`` seconds; closing the connection withdraws the request (the tracker
    skips requests whose connection is closed). The device's own handshake is bounded by
    ``wait`` too; the device ends the session after ``session_timeout`` seconds. Every way of not
    getting a session raises a RuntimeError starting with :data:`DEVICE_UNAVAILABLE`.
    """
    from tvm import rpc

    where = f"{key!r} of the RPC tracker {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=wait) as sock:
            tracker_handshake(sock, f"{host}:{port}")
            sendjson(sock, [TrackerCode.REQUEST, key, "", priority])
            reply = recvjson(sock)
    except TimeoutError:
        raise RuntimeError(f"{DEVICE_UNAVAILABLE}: no device {where} became free within "
                           f"{wait:g} s (it stopped, or another client holds it)") from None
    except (OSError, RuntimeError, struct.error, ValueError) as err:
        raise RuntimeError(f"{DEVICE_UNAVAILABLE}: cannot request {where}: {err}") from None
    if not isinstance(reply, list) or reply[0] != TrackerCode.SUCCESS:
        raise RuntimeError(f"{DEVICE_UNAVAILABLE}: the tracker refused the request for {where}: {reply}")
    url, server_port, matchkey = reply[1]
    try:
        session = call_with_deadline(lambda: rpc.connect(url, server_port, matchkey, session_timeout),
                                     wait, f"the device's RPC server {url}:{server_port}")
        session.patdnn_device = f"{url}:{server_port}"  # which device measured (tuning.farm)
        return session
    except Exception as err:  # noqa: BLE001 (any TVM/socket error: the tracker listed a server that is gone)
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"{DEVICE_UNAVAILABLE}: the device {where} (server {url}:{server_port}) "
                           f"does not answer: {last}") from None


@dataclass(frozen=True)
class TrackerSession:
    """meta_schedule RPCRunner ``f_create_session``: :func:`request_session` for the runner's
    ``RPCConfig`` (RPCRunner's own request waits for the device forever once it is gone)."""

    wait: float

    def __call__(self, config):
        return request_session(config.tracker_host, int(config.tracker_port), config.tracker_key, wait=self.wait,
                               session_timeout=config.session_timeout_sec, priority=config.session_priority)
