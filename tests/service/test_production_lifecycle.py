"""The server on a bad day, under a bounded loopback load: a worker SIGKILLed, SIGTERM with
requests in flight, the --drain-seconds window, and hot reloads with a good and a truncated
model file (the repository API and SIGHUP), checked in every worker."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import orjson
import requests

from tests.service.production import BODY, Load, metrics, sample, wait_for
from tests.service.support import (
    N_FEATURES,
    LiveServer,
    build_mlp_classifier,
    reference_run,
    start_server,
    stop_server,
)


def _serve(model: Path, tmp: Path, *extra: str) -> LiveServer:
    return start_server([str(model), "--workers", "2", *extra], tmp / "serve.log", {})


def _served_hashes(server: LiveServer) -> dict[str, str]:
    """worker pid -> sha256 of the model it serves, from bnserve_model_info."""
    served = {}
    for (name, labels), value in metrics(server.url).items():
        labels = dict(labels)
        if name == "bnserve_model_info" and value == 1:
            served[labels["pid"]] = labels["sha256"]
    return served


def _expected(model_file: Path) -> list[float]:
    x = np.full((1, N_FEATURES), 0.5, dtype=np.float32)
    return reference_run(model_file, x)[0].tolist()


def _answers_like(server: LiveServer, reference: Path, n: int = 20) -> bool:
    want = _expected(reference)
    for _ in range(n):
        got = list(
            requests.post(server.url + "/predict", json=BODY).json()["probabilities"].values()
        )
        if not np.allclose(got, want, atol=1e-6):
            return False
    return True


def test_a_killed_worker_is_replaced_and_the_server_keeps_answering(tmp_path: Path) -> None:
    server = _serve(build_mlp_classifier(tmp_path / "m.onnx"), tmp_path)
    try:
        victim, other = server.worker_pids()
        with Load(server.url, threads=2) as load:
            time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            assert wait_for(lambda: len(set(server.worker_pids()) - {victim, other}) == 1, 30)
            time.sleep(1.0)
        # at most the request the victim was answering fails
        assert len(load.failures) <= 2, load.failures
        assert load.ok > 50
        with Load(server.url, threads=2) as after:
            time.sleep(1.0)
        assert after.failures == [] and after.ok > 20
        (new,) = set(server.worker_pids()) - {other}
        assert wait_for(lambda: str(new) in _served_hashes(server), 10)
        assert str(victim) not in _served_hashes(server)  # marked dead in child_exit
    finally:
        assert stop_server(server) == 0


def _slow_request(port: int) -> tuple[socket.socket, bytes]:
    """A POST whose body is only half sent: in flight in a worker until the rest arrives."""
    body = orjson.dumps(BODY)
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    s.sendall(head + body[:10])
    return s, body[10:]


def _finish(s: socket.socket, rest: bytes) -> bytes:
    s.sendall(rest)
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks)


def test_sigterm_lets_requests_in_flight_complete(tmp_path: Path) -> None:
    server = _serve(build_mlp_classifier(tmp_path / "m.onnx"), tmp_path)
    try:
        sockets = [_slow_request(server.port) for _ in range(2)]  # one in each worker
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        answers = [_finish(s, rest) for s, rest in sockets]
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b'"probabilities"' in answer
        assert server.proc.wait(timeout=30) == 0
        assert "Shutting down: Master" in server.log()
    finally:
        stop_server(server)  # only does something when an assertion failed above


def test_drain_seconds_keeps_serving_while_readiness_says_503(tmp_path: Path) -> None:
    server = _serve(build_mlp_classifier(tmp_path / "m.onnx"), tmp_path, "--drain-seconds", "3")
    try:
        _drain_checks(server)
    finally:
        stop_server(server)


def _drain_checks(server: LiveServer) -> None:
    with Load(server.url, threads=2) as load:
        time.sleep(0.3)
        signaled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: requests.get(server.url + "/v2/health/ready").status_code == 503, 2)
        # every worker says so (fresh connections land on either), and still predicts
        ready = [requests.get(server.url + "/v2/health/ready") for _ in range(10)]
        assert [r.status_code for r in ready] == [503] * 10
        assert requests.get(server.url + "/health").json()["status"] == "draining"
        assert requests.get(server.url + "/v2/health/live").status_code == 200
        time.sleep(max(0.0, 2.0 - (time.monotonic() - signaled)))
        assert requests.post(server.url + "/predict", json=BODY).status_code == 200
        load._stop.set()  # stop the load before the drain ends: the listener closes then
    assert load.failures == [] and load.ok > 20
    assert server.proc.wait(timeout=30) == 0
    assert time.monotonic() - signaled >= 3.0
    assert "draining for 3.0 s" in server.log()


def test_reload_good_then_truncated_file_in_every_worker(tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = build_mlp_classifier(models / "m.onnx", seed=0)
    second = build_mlp_classifier(tmp_path / "second.onnx", seed=7)
    third = build_mlp_classifier(tmp_path / "third.onnx", seed=11)
    server = _serve(path, tmp_path, "--model-control", "explicit")
    try:
        assert _answers_like(server, path, 4)
        with Load(server.url, threads=2) as load:
            # 1. a good new model through the repository API reaches every worker
            path.write_bytes(second.read_bytes())
            r = requests.post(server.url + "/v2/repository/models/m/load")
            assert r.status_code == 200 and r.json()["result"] == "ok", r.text
            sha2 = r.json()["versions"]["1"]
            assert _answers_like(server, second)
            # 2. a truncated file: refused, every worker stays on the good one
            path.write_bytes(second.read_bytes()[:200])
            r = requests.post(server.url + "/v2/repository/models/m/load")
            assert (
                r.status_code == 400 and "still serving the last good version" in r.json()["error"]
            )
            assert _answers_like(server, second)
            # 3. a worker that boots now loads the kept copy, not the truncated file
            os.kill(server.worker_pids()[0], signal.SIGKILL)
            assert wait_for(lambda: len(_served_hashes(server)) == 2, 30)
            time.sleep(0.5)
            # 4. SIGHUP with a truncated file changes nothing; with a good one, every worker
            server.proc.send_signal(signal.SIGHUP)
            time.sleep(2.0)
            assert _answers_like(server, second)
            path.write_bytes(third.read_bytes())
            server.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: _answers_like(server, third, 4), 20)
        assert set(_served_hashes(server).values()) == {
            r.json()["versions"]["1"]
            for r in [requests.post(server.url + "/v2/repository/models/m/load")]
        }
        assert sha2 not in _served_hashes(server).values()
        workers = {str(p) for p in server.worker_pids()}
        assert set(_served_hashes(server)) == workers
        assert _answers_like(server, third)
        values = metrics(server.url)
        assert sample(values, "bnserve_model_reloads_total", model="m", result="ok") == 2
        assert sample(values, "bnserve_model_reloads_total", model="m", result="failed") == 2
        assert "reload of model m failed, keeping the last good model" in server.log()
        # only the SIGKILL can have cost a request
        assert len(load.failures) <= 2, load.failures
        assert server.proc.poll() is None
    finally:
        assert stop_server(server) == 0
