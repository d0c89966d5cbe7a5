"""No RPC step waits past ``--timeout``: peers that accept a connection and never answer.

TVM's own tracker client and device handshake block forever on such a peer (a wrong port that
happens to run another service, a hung phone). Everything here is a real process on 127.0.0.1:
``python -m http.server`` standing in for a tracker, a real ``tvm.exec.rpc_tracker`` and a
process that registers a device with it and then never answers its connections.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn
from phone_helpers import HOST, accepts, free_port, stop_group, wait_until

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.phone.deploy import deploy

PATDNN = Path(sys.executable).parent / "patdnn"
TIMEOUT = 3  # seconds given to --timeout
BOUND = 90  # what "returned in time" means here: the timeout plus compiling on a loaded 2-core box

# Registers KEY with the tracker as TVM's RPC server does (UPDATE_INFO, PUT), then accepts
# connections on its own port and never says a word.
SILENT_DEVICE = """
import json, socket, struct, sys, time
from tvm.rpc import base
tracker_port, key = int(sys.argv[1]), sys.argv[2]
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(8)
port = listener.getsockname()[1]
tracker = socket.create_connection(("127.0.0.1", tracker_port))
tracker.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
assert struct.unpack("<i", base.recvall(tracker, 4))[0] == base.RPC_TRACKER_MAGIC
base.sendjson(tracker, [base.TrackerCode.UPDATE_INFO, {"key": "server:" + key, "addr": ["127.0.0.1", port]}])
assert base.recvjson(tracker) == base.TrackerCode.SUCCESS
base.sendjson(tracker, [base.TrackerCode.PUT, key, (port, base.random_key(key)), "127.0.0.1"])
assert base.recvjson(tracker) == base.TrackerCode.SUCCESS
print("registered", flush=True)
held = []
while True:
    held.append(listener.accept()[0])
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rpc") / "m.onnx"
    onnx.save(build_cnn(np.random.default_rng(3), (1, 4, 8, 8), [ConvSpec(8, connectivity=2.0)]), path)
    return path


@pytest.fixture(scope="module")
def mute_tracker():
    """An HTTP server where a tracker should be: it accepts, reads, and waits for a request line."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", HOST],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: accepts(port), 30, "the HTTP server")
        yield port
    finally:
        stop_group(proc)


@pytest.fixture
def silent_device(tracker_port: int, request: pytest.FixtureRequest):
    """A device key whose one device never answers (each test its own: the tracker hands a device
    out once, and this one never comes back to register again as a real server would)."""
    key = f"silent-{request.node.name[-12:]}"
    proc = subprocess.Popen([sys.executable, "-c", SILENT_DEVICE, str(tracker_port), key], start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "registered"
        yield key
    finally:
        stop_group(proc)


def test_deploy_to_something_that_is_not_a_tracker_gives_up_after_the_timeout(mute_tracker, model_file):
    shown = subprocess.run([str(PATDNN), "deploy", str(model_file), "--target", "arm_cpu-linux", "--tracker",
                            f"{HOST}:{mute_tracker}", "--timeout", str(TIMEOUT)],
                           capture_output=True, text=True, timeout=BOUND)
    assert shown.returncode == 2, shown.stderr
    assert f"error: no TVM RPC tracker answers at {HOST}:{mute_tracker} within {TIMEOUT} s" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_tune_against_something_that_is_not_a_tracker_gives_up_after_the_timeout(mute_tracker, model_file, tmp_path):
    with pytest.raises(PatDNNError, match=f"no TVM RPC tracker answers at {HOST}:{mute_tracker} within {TIMEOUT} s"):
        tvm_patdnn.tune(model_file, "arm_cpu-linux", rpc=f"{HOST}:{mute_tracker}:android", database=tmp_path / "db",
                        timeout=TIMEOUT, progress=None)


def test_deploy_to_a_device_that_never_answers_gives_up_after_the_timeout(silent_device, tracker_port, model_file):
    with pytest.raises(PatDNNError, match=f"device '{silent_device}'.*does not answer.*within {TIMEOUT} s"):
        deploy(model_file, "arm_cpu-linux", tracker=(HOST, tracker_port), key=silent_device, timeout=TIMEOUT,
               session_timeout=TIMEOUT)


def test_tune_on_a_device_that_never_answers_stops_after_the_timeout(silent_device, tracker_port, model_file, tmp_path):
    results = tvm_patdnn.tune(model_file, "arm_cpu-linux", rpc=f"{HOST}:{tracker_port}:{silent_device}",
                              database=tmp_path / "db", trials=4, timeout=TIMEOUT, progress=None)
    assert results.stopped is not None and "does not answer" in results.stopped
    assert f"within {TIMEOUT} s" in results.stopped
