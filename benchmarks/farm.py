"""Tuning throughput on a farm of 1 and 2 emulated phones: trials measured per minute.

Starts a real RPC tracker and ``patdnn phone-emulator`` processes on 127.0.0.1 (all under one
key), then tunes the same small pattern-pruned model over RPC with 1 and then 2 phones in the
farm, each into a fresh database, and prints trials per minute and the per-device counts.

The emulator runs every session in qemu-user, 20-50x slower than a phone, and this box has 2
cores shared by the tuner's builds and both qemu processes: the ratio is what two emulated
devices buy here, not what a rack of phones would.

    .venv/bin/python -m benchmarks.farm [--trials 24] [--json benchmarks/results/farm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import tvm_patdnn
from tvm_patdnn.fileio import write_bytes_atomic
from tvm_patdnn.pruning import project_pattern_and_connectivity, select_pattern_set
from tvm_patdnn.tuning.commands import format_results
from tvm_patdnn.rpc import tracker_devices

HOST = "127.0.0.1"
KEY = "farm-bench"
PATDNN = Path(sys.executable).parent / "patdnn"


def model(channels: int = 16, size: int = 14):
    """One 3x3 pattern conv (8 patterns, 3.6x connectivity) with bias and ReLU."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
    weight = project_pattern_and_connectivity(weight, select_pattern_set([weight], n_patterns=8), 3.6)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["output"])]
    graph = helper.make_graph(
        nodes, "farm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, size, size])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(channels, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def wait_for(ready, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except RuntimeError:  # not answering yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start(args: list[str], ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if ready and ready not in proc.stdout.readline():
        stop(proc)
        raise SystemExit(f"{args[:4]} did not start")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "farm.json")
    args = parser.parse_args()

    port = free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
                                "--port-end", str(port + 1), "--silent"], start_new_session=True)
    wait_for(lambda: tracker_devices(HOST, port, KEY, 10) is not None, "the tracker")
    phones, rows = [], []
    try:
        for count in (1, 2):
            while len(phones) < count:
                phones.append(start([str(PATDNN), "phone-emulator", "--tracker", f"{HOST}:{port}", "--key", KEY,
                                     "--host", HOST, "--port", str(free_port())], "listening on"))
            wait_for(lambda: len(tracker_devices(HOST, port, KEY, 10)) >= count, f"{count} phone(s) at the tracker")
            with tempfile.TemporaryDirectory() as scratch:
                started = time.monotonic()
                results = tvm_patdnn.tune(model(), "arm_cpu-linux", trials=args.trials, trials_per_iter=8,
                                          database=Path(scratch) / "db", rpc=f"{HOST}:{port}:{KEY}", timeout=120,
                                          progress=sys.stderr)
                minutes = (time.monotonic() - started) / 60
            measured = sum(stats.trials for stats in results.devices.values())
            print(format_results(results), file=sys.stderr)
            rows.append({"phones": count, "trials_measured": measured, "minutes": minutes,
                         "trials_per_minute": measured / minutes,
                         "per_device": {d: vars(s) for d, s in results.devices.items()}, "stopped": results.stopped})
    finally:
        for proc in phones + [tracker]:
            stop(proc)

    print("| phones | trials measured | minutes | trials/min | per device |")
    print("|---|---|---|---|---|")
    for row in rows:
        per_device = ", ".join(f"{s['trials']}" for s in row["per_device"].values())
        print(f"| {row['phones']} | {row['trials_measured']} | {row['minutes']:.1f} | {row['trials_per_minute']:.1f} "
              f"| {per_device} |")
    ratio = rows[1]["trials_per_minute"] / rows[0]["trials_per_minute"]
    print(f"2 phones / 1 phone: {ratio:.2f}x")
    write_bytes_atomic(args.json, json.dumps({"rows": rows, "ratio": ratio, "cpu_count": os.cpu_count()},
                                             indent=2).encode())


if __name__ == "__main__":
    main()
