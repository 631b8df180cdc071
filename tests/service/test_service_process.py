"""The serving process: gunicorn in-process, workers forked with their own sessions, clean stop,
refusals before start-up, and no writes under HOME (gunicorn's control socket is off)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.service.support import (
    REPO_ROOT,
    LiveServer,
    build_mlp_classifier,
    start_server,
    stop_server,
)


def test_two_workers_are_children_of_the_serve_process(server: LiveServer) -> None:
    workers = server.worker_pids()
    assert len(workers) == 2  # the probe process has exited; only gunicorn workers remain
    for pid in workers:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"serve" in cmdline


def test_read_only_home_does_not_bother_gunicorn(server: LiveServer) -> None:
    log = server.log()
    assert "Listening at: http://127.0.0.1" in log
    assert "control socket" not in log.lower()


def test_the_master_does_not_import_onnxruntime() -> None:
    """onnxruntime state inherited through fork made workers hang at exit for the whole
    graceful timeout; the master process must only ever import the light modules."""
    code = (
        "import sys, bnserve.service.cli, bnserve.service.gunicorn_conf, bnserve.service.probe, "
        "bnserve.service.repository, bnserve.service.reload;"
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'flask') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout
    assert out.strip() == "[]"


def test_sigterm_stops_the_server_quickly_and_cleanly(foreign_file: Path, tmp_path: Path) -> None:
    live = start_server([str(foreign_file), "--workers", "1"], tmp_path / "log", {})
    assert requests.get(live.url + "/health", timeout=5).status_code == 200
    start = time.monotonic()
    assert stop_server(live) == 0
    assert time.monotonic() - start < 10, live.log()
    assert "Shutting down: Master" in live.log()


def _serve(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnserve", "serve", *args, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


def test_a_newer_format_version_refuses_to_start(tmp_path: Path) -> None:
    path = build_mlp_classifier(tmp_path / "m.onnx", metadata={"bnserve.format_version": "9"})
    done = _serve([str(path)])
    assert done.returncode == 2
    assert "model format version 9 is newer than this service understands" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Starting gunicorn" not in done.stderr


def test_device_cuda_refuses_to_start_without_cuda(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    done = _serve([str(build_mlp_classifier(tmp_path / "m.onnx")), "--device", "cuda"])
    assert done.returncode == 2
    assert "--device cuda" in done.stderr and "CUDAExecutionProvider" in done.stderr
    assert "Starting gunicorn" not in done.stderr


def test_missing_model_is_a_usage_error() -> None:
    done = _serve([])
    assert done.returncode == 2
    assert "no model: pass an .onnx file or repository, or set BNSERVE_MODEL" in done.stderr
