"""The README's examples run as written: every code block marked ``<!-- readme-test -->`` is taken
from README.md itself (so the two cannot drift) and run in order, in one fresh directory, the
way a new user pastes them after ``bash setup.sh`` (``.venv`` there is this checkout's venv).
Shell blocks run with bash (``-e``: any failing command fails the test), Python blocks with the
venv's Python; later blocks use the files earlier ones made (``pruned.onnx``, ``model.so``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test -->"
BLOCK = re.compile(re.escape(MARK) + r"\n```(\w*)\n(.*?)\n```", re.S)


def marked_blocks() -> list[tuple[str, str]]:
    """(language, code) of every marked block, in README order."""
    text = (ROOT / "README.md").read_text()
    blocks = [(language or "bash", code) for language, code in BLOCK.findall(text)]
    assert len(blocks) == text.count(MARK), "a readme-test mark must stand right above a fenced block"
    return blocks


def test_the_readme_marks_the_quick_start_and_the_examples():
    languages = [language for language, _code in marked_blocks()]
    assert languages[0] == "bash" and languages.count("python") >= 3


@pytest.mark.timeout(1500)
def test_every_marked_readme_block_runs_as_written(tmp_path):
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    for number, (language, code) in enumerate(marked_blocks(), 1):
        if language == "python":
            command = [str(tmp_path / ".venv" / "bin" / "python"), "-c", code]
        else:
            command = ["bash", "-euo", "pipefail", "-c", code]
        shown = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert shown.returncode == 0, f"README block {number} ({language}) failed:\n{code}\n--- stderr:\n{shown.stderr[-3000:]}"
        assert "Traceback" not in shown.stderr, f"README block {number} printed a traceback:\n{shown.stderr[-3000:]}"
    assert (tmp_path / "pruned.onnx").is_file() and (tmp_path / "model.so").is_file()
