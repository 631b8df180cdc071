"""Operators changing files under a running server: token files rewritten (and emptied) while
workers restart, a reload to a model with another signature, a storm of SIGHUPs while a worker
is killed, load/unload under `--model-control explicit`, and metrics across worker recycling."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import requests

from tests.service.production import BODY, metrics, sample, wait_for
from tests.service.support import (
    N_FEATURES,
    LiveServer,
    build_mlp_classifier,
    file_sha256,
    reference_run,
    start_server,
    stop_server,
)

OLD, NEW = "old-token-0123456789", "new-token-9876543210"


def _statuses_by_worker(server: LiveServer, token: str) -> dict[int, set[int]]:
    """{status: worker pids that answered it}, sending requests on fresh connections until
    every live worker has answered some (the kernel does not spread connections evenly)."""
    workers = set(server.worker_pids())
    tag = f"agree-{time.monotonic_ns()}-"
    statuses: dict[str, int] = {}
    by_status: dict[int, set[int]] = defaultdict(set)
    for batch in range(20):
        for i in range(20):
            request_id = f"{tag}{batch}-{i}"
            r = requests.post(
                server.url + "/predict",
                json=BODY,
                headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
                timeout=10,
            )
            statuses[request_id] = r.status_code
        time.sleep(0.1)  # the access log line is written after the answer
        by_status.clear()
        for line in server.log().splitlines():
            if tag in line and line.startswith('{"ts"'):
                entry = json.loads(line)
                by_status[statuses[entry["request_id"]]].add(entry["pid"])
        if set().union(*by_status.values()) >= workers:
            break
    return dict(by_status)


def _agree(server: LiveServer, accepted: str, refused: str) -> bool:
    """Every live worker accepts `accepted` and refuses `refused` (each worker seen)."""
    workers = set(server.worker_pids())
    good = _statuses_by_worker(server, accepted)
    bad = _statuses_by_worker(server, refused)
    return good == {200: workers} and bad == {401: workers}


def _kill_a_worker(server: LiveServer) -> None:
    before = set(server.worker_pids())
    os.kill(min(before), signal.SIGKILL)
    assert wait_for(lambda: len(set(server.worker_pids()) - before) == 1, 30)
    assert wait_for(lambda: requests.get(server.url + "/v2/health/ready").status_code == 200, 30)


def test_every_worker_agrees_on_the_tokens_through_changes_and_restarts(tmp_path: Path) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx")
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    server = start_server(
        [str(model), "--workers", "2", "--token-file", str(token_file)],
        tmp_path / "serve.log",
        {},
    )
    try:
        assert _agree(server, OLD, NEW)
        # the file changes; a worker restarts before anyone says so: still the old tokens
        token_file.write_text(f"{NEW}\n")
        _kill_a_worker(server)
        assert _agree(server, OLD, NEW)
        # SIGHUP: every worker switches together, and one started afterwards agrees
        server.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: _agree(server, NEW, OLD), 20)
        _kill_a_worker(server)
        assert _agree(server, NEW, OLD)
        # an empty file, then an unreadable one: refused, logged, the last good token stays
        for bad in ("# rotated, nothing yet\n", None):
            if bad is None:
                token_file.unlink()
            else:
                token_file.write_text(bad)
            server.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "token file not reloaded" in server.log(), 20)
            _kill_a_worker(server)
            assert _agree(server, NEW, OLD)
        assert server.proc.poll() is None
        assert "no token in it" in server.log() and "cannot read it" in server.log()
    finally:
        assert stop_server(server) == 0


def _answers(server: LiveServer, n_features: int) -> list[float]:
    r = requests.post(server.url + "/predict", json={"features": [0.5] * n_features}, timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["probabilities"].values())


def _expected(model: Path, n_features: int) -> list[float]:
    return reference_run(model, np.full((1, n_features), 0.5, dtype=np.float32))[0].tolist()


def _every_worker_serves(server: LiveServer, model: Path, n_features: int) -> bool:
    expected = _expected(model, n_features)
    return all(np.allclose(_answers(server, n_features), expected, atol=1e-6) for _ in range(12))


def test_a_reload_to_another_signature_is_refused_then_allowed(tmp_path: Path) -> None:
    path = build_mlp_classifier(tmp_path / "models" / "m.onnx", seed=0)
    narrow = build_mlp_classifier(
        tmp_path / "narrow.onnx", seed=3, n_features=4, feature_names=None
    )
    server = start_server(
        [str(path), "--workers", "2", "--model-control", "explicit"], tmp_path / "serve.log", {}
    )
    try:
        original = path.read_bytes()
        path.write_bytes(narrow.read_bytes())
        # SIGHUP: refused, the difference logged, every worker on the 8-feature model
        server.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "n_features: 8 -> 4" in server.log(), 20)
        path_copy = tmp_path / "original.onnx"
        path_copy.write_bytes(original)
        assert _every_worker_serves(server, path_copy, N_FEATURES)
        assert requests.get(server.url + "/v2/health/ready").status_code == 200
        # the load route: refused with the readable diff
        r = requests.post(server.url + "/v2/repository/models/m/load")
        assert r.status_code == 400
        message = r.json()["error"]
        assert "n_features: 8 -> 4" in message and "feature_names:" in message
        assert "allow_signature_change" in message
        assert _every_worker_serves(server, path_copy, N_FEATURES)
        # allowed explicitly: every worker serves the new model, metadata names its hash
        r = requests.post(
            server.url + "/v2/repository/models/m/load",
            json={"parameters": {"allow_signature_change": True}},
        )
        assert r.status_code == 200 and r.json()["result"] == "ok", r.text
        assert r.json()["versions"]["1"] == file_sha256(narrow)
        assert _every_worker_serves(server, narrow, 4)
        for _ in range(6):
            meta = requests.get(server.url + "/v2/models/m").json()
            assert meta["inputs"][0]["shape"] == [-1, 4]
            assert meta["parameters"]["sha256"] == file_sha256(narrow)
        r = requests.post(server.url + "/predict", json=BODY)
        assert r.status_code == 400 and "expected 4 features" in r.json()["error"]
        # a bad parameter is refused, not ignored
        r = requests.post(
            server.url + "/v2/repository/models/m/load", json={"parameters": {"config": "{}"}}
        )
        assert r.status_code == 400 and "unsupported load parameter(s) config" in r.json()["error"]
    finally:
        assert stop_server(server) == 0


def test_a_storm_of_sighups_while_a_worker_is_killed(tmp_path: Path) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx")
    server = start_server([str(model), "--workers", "2"], tmp_path / "serve.log", {})
    try:
        before = set(server.worker_pids())
        os.kill(min(before), signal.SIGKILL)
        for _ in range(20):
            server.proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        # the master stays free: the dead worker is replaced within seconds, not after 20 probes
        assert wait_for(lambda: len(set(server.worker_pids()) - before) == 1, 10)
        assert wait_for(lambda: "SIGHUP" in server.log() and not _runner_alive(server), 30)
        for _ in range(20):
            assert requests.post(server.url + "/predict", json=BODY).status_code == 200
        passes = sample(
            metrics(server.url), "bnserve_model_reloads_total", model="m", result="unchanged"
        )
        assert 1 <= passes <= 10, passes  # coalesced: 20 requests, a few passes
        assert server.proc.poll() is None
    finally:
        assert stop_server(server) == 0


def _runner_alive(server: LiveServer) -> bool:
    return any(b"service.reload" in cmdline for cmdline in server.children().values())


def test_model_control_none_refuses_load_and_unload(tmp_path: Path) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx")
    server = start_server([str(model), "--workers", "1"], tmp_path / "serve.log", {})
    try:
        for action in ("load", "unload"):
            r = requests.post(server.url + f"/v2/repository/models/m/{action}")
            assert r.status_code == 403
            assert "--model-control explicit" in r.json()["error"]
        assert requests.post(server.url + "/predict", json=BODY).status_code == 200
    finally:
        assert stop_server(server) == 0


def test_explicit_load_and_unload_with_a_token(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = build_mlp_classifier(repo / "a" / "1" / "model.onnx", seed=1)
    build_mlp_classifier(repo / "b" / "1" / "model.onnx", seed=2)
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{OLD}\n")
    auth = {"Authorization": f"Bearer {OLD}"}
    server = start_server(
        [
            str(repo),
            "--model-name",
            "a",
            "--workers",
            "2",
            "--model-control",
            "explicit",
            "--token-file",
            str(token_file),
        ],
        tmp_path / "serve.log",
        {},
    )
    infer = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
    try:
        r = requests.post(server.url + "/v2/repository/models/b/unload")
        assert r.status_code == 401
        r = requests.post(server.url + "/v2/repository/models/b/unload", headers=auth)
        assert r.status_code == 200 and r.json()["result"] == "unloaded", r.text
        for _ in range(6):  # every worker
            r = requests.post(server.url + "/v2/models/b/infer", json=infer, headers=auth)
            assert r.status_code == 404 and "unloaded" in r.json()["error"]
            assert requests.post(server.url + "/predict", json=BODY, headers=auth).ok
        index = requests.post(server.url + "/v2/repository/index", headers=auth).json()
        assert {"name": "b", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        assert requests.get(server.url + "/v2/health/ready").status_code == 200
        # a worker that starts now does not serve it either
        _kill_a_worker(server)
        for _ in range(6):
            r = requests.post(server.url + "/v2/models/b/infer", json=infer, headers=auth)
            assert r.status_code == 404
        r = requests.post(server.url + "/v2/repository/models/b/load", headers=auth)
        assert r.status_code == 200 and r.json()["result"] == "ok", r.text
        for _ in range(6):
            r = requests.post(server.url + "/v2/models/b/infer", json=infer, headers=auth)
            assert r.status_code == 200
        r = requests.post(server.url + "/v2/repository/models/zzz/load", headers=auth)
        assert r.status_code == 404
        # a model added to the repository after start
        added = build_mlp_classifier(repo / "c" / "1" / "model.onnx", seed=5)
        r = requests.post(server.url + "/v2/repository/models/c/load", headers=auth)
        assert r.status_code == 200 and r.json()["versions"]["1"] == file_sha256(added), r.text
        expected = reference_run(added, np.full((1, 8), 0.5, dtype=np.float32))[0]
        for _ in range(6):
            r = requests.post(server.url + "/v2/models/c/infer", json=infer, headers=auth)
            assert r.status_code == 200
            assert np.allclose(r.json()["outputs"][0]["data"], expected, atol=1e-6)
        # unloading the model POST /predict serves
        r = requests.post(server.url + "/v2/repository/models/a/unload", headers=auth)
        assert r.status_code == 200
        r = requests.post(server.url + "/predict", json=BODY, headers=auth)
        assert r.status_code == 404 and "unloaded" in r.json()["error"]
        r = requests.post(server.url + "/v2/repository/models/a/load", headers=auth)
        assert r.status_code == 200 and r.json()["versions"]["1"] == file_sha256(first)
        assert requests.post(server.url + "/predict", json=BODY, headers=auth).ok
    finally:
        assert stop_server(server) == 0


def test_metrics_files_stay_bounded_and_counts_survive_worker_recycling(tmp_path: Path) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx")
    metrics_dir = tmp_path / "metrics"
    server = start_server(
        [
            str(model),
            "--workers",
            "2",
            "--max-requests",
            "10",
            "--max-requests-jitter",
            "0",
            "--metrics-dir",
            str(metrics_dir),
        ],
        tmp_path / "serve.log",
        {},
    )
    try:
        sent = 0
        deadline = time.monotonic() + 60
        while server.log().count("Autorestarting worker") < 8 and time.monotonic() < deadline:
            r = requests.post(server.url + "/predict", json=BODY, timeout=10)
            assert r.status_code == 200, r.text
            sent += 1
            time.sleep(0.01)
        assert server.log().count("Autorestarting worker") >= 8
        counted = sample(
            metrics(server.url),
            "bnserve_requests_total",
            route="/predict",
            method="POST",
            status="200",
        )
        assert counted == sent  # no count lost with the workers that exited
        files = sorted(p.name for p in metrics_dir.glob("*.db"))
        # the live workers' files and one archive per type, not one per worker ever started
        assert len(files) <= 2 * 5 + 2, files
        assert "counter_0archive.db" in files and "histogram_0archive.db" in files
    finally:
        assert stop_server(server) == 0
