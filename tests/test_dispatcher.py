"""The `bnserve` command itself: a reader that stops early gets no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.service.support import REPO_ROOT, build_mlp_classifier


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


def _piped_into_head(argv: list[str]) -> tuple[int, str, str]:
    """`bnserve ARGV | head -1` through a real pipe: the exit status, the line head printed and
    what bnserve wrote to standard error."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnserve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    head = subprocess.Popen(["head", "-1"], stdin=proc.stdout, stdout=subprocess.PIPE)
    proc.stdout.close()  # head holds the only reading end: when it exits, the pipe is closed
    line = head.communicate(timeout=120)[0].decode()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.wait(timeout=120), line, stderr


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model and 20000 rows: several MiB of predictions, far more than a pipe buffers, so
    the writes meet the closed pipe while the command is still writing."""
    tmp = tmp_path_factory.mktemp("pipe")
    model = build_mlp_classifier(tmp / "m.onnx", seed=1)
    np.savez(tmp / "x.npz", X=np.random.default_rng(0).normal(size=(20000, 8)))
    return model, tmp / "x.npz"


def test_predict_to_standard_output_into_head_ends_quietly(many_rows: tuple[Path, Path]) -> None:
    model, data = many_rows
    code, line, stderr = _piped_into_head(["predict", str(model), str(data), "-o", "-"])
    assert line == "label,class_index,p_cat,p_dog,p_bird\r\n"
    assert code in (0, 141)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_evaluate_into_head_ends_quietly(iris_run: Path) -> None:
    ckpt = str(iris_run / "checkpoint.npz")
    for options, first in (([], "held-out split: 30 of 150 rows ("), (["--json"], "{\n")):
        code, line, stderr = _piped_into_head(["evaluate", ckpt, "sklearn:iris", *options])
        assert line.startswith(first)
        assert code in (0, 141)
        assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_study_and_predict_output_into_a_closed_pipe_end_quietly(
    command: str, iris_run: Path, many_rows: tuple[Path, Path]
) -> None:
    model, data = many_rows
    argv = {
        "evaluate": ["evaluate", str(iris_run / "checkpoint.npz"), "sklearn:iris"],
        "predict": ["predict", str(model), str(data), "-o", "-"],
    }[command]
    test_a_closed_output_pipe_ends_quietly(argv)
