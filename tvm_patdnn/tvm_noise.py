"""TVM's harmless C++ log lines, dropped at tvm_patdnn's boundary and nowhere else.

Some of TVM 0.27's C++ warnings tell a tvm_patdnn user nothing they can act on:

* ``executable.cc: Warning: Scope Saving:`` / ``Scope Loaded:`` with an empty scope, one line per
  constant: creating a Relax VM (``CompiledModel.run``) fills the executable's memory-scope map
  with an empty scope for every constant (``vm.cc``: ``exec_->memory_scopes[i]``), and
  ``SaveMemoryScopeSection`` logs each entry when the library is exported (and again when it is
  loaded). An empty scope is the default "global" memory; nothing is wrong.
* ``Unknown schedule rule "meta_schedule.pool_max"`` (and the other pools), with its list of
  looked-up function names, on every tune of a model with pooling: TOPI annotates pool blocks with
  ``meta_schedule.pool_max`` but meta_schedule looks it up as
  ``s_tir.meta_schedule.<key>.meta_schedule.pool_max``, finds nothing, and falls back to the
  generic rules, which is what it should do anyway.

C++ writes them straight to file descriptor 2, where Python's ``warnings``/``logging`` filters
cannot reach, so :func:`filter_tvm_noise` points fd 2 at a pipe for the duration of a call and a
``grep`` process copies every other line through unchanged, in order. A separate process rather
than a thread, so that even a crash's last words (a segfault, an abort message) still reach the
terminal. Real warnings and errors, including these warnings with a non-empty scope, pass.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

__all__ = ["NOISE_PATTERNS", "filter_tvm_noise"]

# Extended regular expressions (grep -E), one per kind of line; a line matching any is dropped.
NOISE_PATTERNS = (
    r"executable\.cc:[0-9]+: Warning: Scope (Saving|Loaded): *$",
    r'Warning: Unknown schedule rule "meta_schedule\.(adaptive_)?pool_(max|avg|sum)"',
    r"^ +s_tir\.meta_schedule\.[a-z_]+\.meta_schedule\.(adaptive_)?pool_(max|avg|sum)$",
)

_lock = threading.Lock()
_depth = 0  # nested filters share the outermost one


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def filter_tvm_noise() -> Iterator[None]:
    """Within the block, lines written to fd 2 that match :data:`NOISE_PATTERNS` are dropped."""
    global _depth
    grep = shutil.which("grep")
    with _lock:
        _depth += 1
        outermost = _depth == 1
    if not outermost or grep is None or not _is_open(2):  # without grep: the noise, not a broken stderr
        try:
            yield
        finally:
            with _lock:
                _depth -= 1
        return
    sys.stderr.flush()
    saved = os.dup(2)
    command = [grep, "--line-buffered", "-v", "-E"]
    for pattern in NOISE_PATTERNS:
        command += ["-e", pattern]
    # grep exits 1 when it printed nothing; its stdout is the real stderr.
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=saved, stderr=saved, close_fds=True)
    try:
        os.dup2(process.stdin.fileno(), 2)
        process.stdin.close()
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes our last write end: grep sees EOF once children let go too
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=2)  # worker processes started inside may still hold the pipe
        with _lock:
            _depth -= 1
