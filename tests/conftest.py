import os
import sys
from pathlib import Path

# tests/ helpers (model_factory, phone_helpers) import as plain modules
sys.path.insert(0, str(Path(__file__).parent))

import subprocess
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

# In CI (CI=true) the suite must be reproducible and complete: Hypothesis draws the same
# examples every run, and a test skipped for a missing tool, package or data set (qemu, the
# cross compiler, PoCL, torch, the MNIST packages) fails instead: setup.sh installs them all,
# so a skip there means a broken set-up that would otherwise pass unnoticed.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# ... except a skip for the host's CPU (code built for an ISA the machine does not have: no set-up
# provides AVX-512 on an AVX2 host), whose reason starts with this; the code is still built.
HOST_CPU_SKIP = "host CPU:"
settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    settings.load_profile("ci")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.removeprefix("Skipped: ").startswith(HOST_CPU_SKIP):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where setup.sh provides every tool and data set: {reason}"


@pytest.fixture(scope="session")
def phone_runtime() -> None:
    """Skip without qemu/cross compiler; fail if setup did not cache the aarch64 runtime."""
    from phone_helpers import missing_tools

    from tvm_patdnn.phone import runtime

    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    if not runtime.runtime_is_cached():
        pytest.fail(
            f"aarch64 TVM runtime not cached in {runtime.cache_dir()}: setup/CI must run "
            "`python -m tvm_patdnn.phone.runtime` first (tests never download)"
        )


@pytest.fixture(scope="session")
def tracker_port() -> Iterator[int]:
    """A real ``tvm.exec.rpc_tracker`` on 127.0.0.1, in its own process group."""
    from phone_helpers import HOST, accepts, free_port, stop_group, wait_until

    for _attempt in range(5):  # a free port can be taken by another process before the tracker binds it
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
             "--port-end", str(port + 1), "--silent"],
            start_new_session=True, stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: accepts(port) or proc.poll() is not None, 60, "the tracker")
        if proc.poll() is None:
            break
    assert proc.poll() is None, "rpc_tracker exited at start five times"
    try:
        yield port
    finally:
        stop_group(proc)


@pytest.fixture
def start_phone(phone_runtime, tracker_port: int, tmp_path: Path) -> Iterator[Callable]:
    """Start emulated phones (``start_phone(key, host=...)``); whatever is left is killed after the test."""
    from phone_helpers import EmulatedPhone

    started = []

    def start(key: str, **kwargs) -> EmulatedPhone:
        phone = EmulatedPhone(tracker_port, key, tmp_path / f"emulator-{len(started)}-{key}.log", **kwargs)
        started.append(phone)
        return phone

    try:
        yield start
    finally:
        for phone in started:
            phone.kill()


@pytest.fixture(scope="module")
def emulator(request: pytest.FixtureRequest, phone_runtime, tracker_port: int,
             tmp_path_factory: pytest.TempPathFactory):
    """The module's emulated phone, registered under the module's ``PHONE_KEY`` (default "android")."""
    from phone_helpers import EmulatedPhone

    key = getattr(request.module, "PHONE_KEY", "android")
    phone = EmulatedPhone(tracker_port, key, tmp_path_factory.mktemp("phone") / "emulator.log")
    try:
        yield phone
    finally:
        assert phone.stop() == 0
