"""The `bnserve` command itself: a reader that stops early gets no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.service.support import REPO_ROOT


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["train", "--help"]])
def test_a_closed_output_pipe_ends_quietly(argv: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnserve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    proc.stdout.close()  # like `| head -0`: every write the command makes meets EPIPE
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) in (0, 141)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
