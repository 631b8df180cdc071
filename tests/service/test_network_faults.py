"""Clients that misbehave on purpose, against a live server with its default worker model:
slow headers and bodies from 50 connections, short bodies, malformed chunked framing, keep-alive
reuse, and requests built to make a worker allocate without bound."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests

from tests.service.production import BODY
from tests.service.support import (
    N_FEATURES,
    LiveServer,
    build_mlp_classifier,
    start_server,
    stop_server,
)

KEEP_ALIVE = 2
BODY_TIMEOUT = 1.5
SLOW_CLIENTS = 50
INFER = {"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32"}]}
INFER["inputs"][0]["data"] = [0.5] * N_FEATURES


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The default worker model (gevent), 2 workers, short deadlines so the tests are quick."""
    tmp = tmp_path_factory.mktemp("net")
    model = build_mlp_classifier(tmp / "m.onnx")
    live = start_server(
        [
            str(model),
            "--workers",
            "2",
            "--keep-alive",
            str(KEEP_ALIVE),
            "--body-timeout",
            str(BODY_TIMEOUT),
        ],
        tmp / "serve.log",
        {},
    )
    yield live
    assert stop_server(live) == 0


def _connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response read off a raw socket (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (recv sees EOF or a reset)."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


class SlowClients:
    """`count` connections that each send a partial request, then one more byte now and then."""

    def __init__(self, server: LiveServer, count: int, start: bytes, drip: bytes) -> None:
        self.socks = [_connect(server) for _ in range(count)]
        for sock in self.socks:
            sock.sendall(start)
        self.drip = drip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for sock in self.socks:
                with contextlib.suppress(OSError):  # the server closed it: the deadline works
                    sock.sendall(self.drip)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


def _served_while(server: LiveServer, seconds: float) -> tuple[int, list[str]]:
    """POST /predict in a loop for `seconds`; (answered, failures). Each request must be
    answered within 2 s: under a blocked worker model it is not answered at all."""
    ok, failures = 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            r = requests.post(server.url + "/predict", json=BODY, timeout=2)
            if r.status_code == 200:
                ok += 1
            else:
                failures.append(f"{r.status_code} {r.text[:100]}")
        except requests.RequestException as exc:
            failures.append(type(exc).__name__)
        time.sleep(0.02)
    return ok, failures


def test_slow_headers_from_50_connections_block_nobody_and_are_cut_off(net: LiveServer) -> None:
    start = b"POST /predict HTTP/1.1\r\nHost: x\r\n"
    with SlowClients(net, SLOW_CLIENTS, start, b"X-Slow: 1\r\n") as slow:
        ok, failures = _served_while(net, 3.0)
        assert failures == [] and ok > 20, (ok, failures)
        # the headers' deadline is the keep-alive time: every slow connection is closed
        closed = sum(_closed_by_server(s, KEEP_ALIVE + 3.0) for s in slow.socks)
        assert closed == SLOW_CLIENTS


def test_slow_bodies_from_50_connections_get_408_and_free_their_slot(net: LiveServer) -> None:
    start = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n[0"
    )
    with SlowClients(net, SLOW_CLIENTS, start, b",0") as slow:
        ok, failures = _served_while(net, 2.0)
        assert failures == [] and ok > 20, (ok, failures)
        answers = []
        for sock in slow.socks:
            sock.settimeout(BODY_TIMEOUT + 5)
            status, _, body = _read_response(sock)
            answers.append((status, orjson.loads(body)["error"][:40]))
            assert _closed_by_server(sock, 3.0)
    assert set(answers) == {(408, "the request body did not arrive in time ")}


def test_a_body_shorter_than_its_content_length(net: LiveServer) -> None:
    payload = orjson.dumps(BODY)
    # the client keeps the connection open: the deadline answers 408
    with _connect(net) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(payload) + 50)
            + payload
        )
        began = time.monotonic()
        status, headers, body = _read_response(sock)
        assert status == 408 and headers["content-type"] == "application/json"
        assert "Content-Length" in orjson.loads(body)["error"]
        assert time.monotonic() - began < BODY_TIMEOUT + 5
    # the client says it is done sending: 400 at once, naming both sizes
    with _connect(net) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(payload) + 50)
            + payload
        )
        sock.shutdown(socket.SHUT_WR)
        status, _, body = _read_response(sock)
        assert status == 400
        message = orjson.loads(body)["error"]
        assert f"after {len(payload)} of the {len(payload) + 50} bytes" in message


@pytest.mark.parametrize("size", [b"zz", b"-5", b"0x10", b""])
@pytest.mark.parametrize("route", ["/predict", "/v2/models/m/infer"])
def test_malformed_chunk_sizes_are_400_json(net: LiveServer, size: bytes, route: str) -> None:
    with _connect(net) as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % route.encode()
            + size
            + b"\r\n{}\r\n0\r\n\r\n"
        )
        status, headers, body = _read_response(sock)
    assert status == 400 and headers["content-type"] == "application/json"
    assert "chunk" in orjson.loads(body)["error"].lower()
    assert "Traceback" not in net.log()


def test_keep_alive_connections_are_reused(net: LiveServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", net.port, timeout=10)
    conn.connect()
    first = conn.sock
    for route, document in (("/predict", BODY), ("/v2/models/m/infer", INFER)) * 5:
        conn.request("POST", route, orjson.dumps(document), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("Connection") == "keep-alive"
        response.read()
        assert conn.sock is first  # no reconnect: the same socket served all ten
    conn.close()
    with requests.Session() as session:  # what most Python clients do
        for _ in range(20):
            assert session.post(net.url + "/predict", json=BODY).status_code == 200


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_time(
    net: LiveServer,
) -> None:
    with _connect(net) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200
        assert not _closed_by_server(sock, KEEP_ALIVE - 1.0)
        assert _closed_by_server(sock, 4.0)


def _worker_peak_rss_mb(server: LiveServer) -> float:
    peaks = []
    for pid in server.worker_pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def test_output_fan_out_and_container_floods_are_refused_before_they_cost_memory(
    net: LiveServer,
) -> None:
    before = _worker_peak_rss_mb(net)
    fan_out = dict(INFER, outputs=[{"name": "probabilities"}] * 600_000)  # 15 MB of JSON
    r = requests.post(net.url + "/v2/models/m/infer", data=orjson.dumps(fan_out), timeout=60)
    assert r.status_code == 400 and "arrays/objects" in r.json()["error"]
    twice = dict(INFER, outputs=[{"name": "probabilities"}, {"name": "probabilities"}])
    r = requests.post(net.url + "/v2/models/m/infer", data=orjson.dumps(twice))
    assert r.status_code == 400 and "requested twice" in r.json()["error"]
    three = dict(INFER, outputs=[{"name": "probabilities"}, {"name": "logits"}, {"name": "x"}])
    r = requests.post(net.url + "/v2/models/m/infer", data=orjson.dumps(three))
    assert r.status_code == 400 and "each may be requested once" in r.json()["error"]
    params = dict(INFER, parameters={f"p{i}": i for i in range(1000)})
    r = requests.post(net.url + "/v2/models/m/infer", data=orjson.dumps(params))
    assert r.status_code == 400 and "at most 32 allowed" in r.json()["error"]
    flood = b"[" + b"[]," * (5 * 1024 * 1024) + b"[]]"  # 15 MiB of empty arrays
    r = requests.post(net.url + "/predict", data=flood, timeout=60)
    assert r.status_code == 400 and "arrays/objects" in r.json()["error"]
    numbers = b'{"features": [' + b"0.1," * (4 * 1024 * 1024 - 8) + b"0.1]}"  # 16 MiB
    r = requests.post(net.url + "/predict", data=numbers, timeout=60)
    assert r.status_code == 400 and "values" in r.json()["error"]
    # the worst a body can still do: the longest numbers that fit the value budget
    # (--max-batch rows of the model's features, twice over), parsed, then refused
    long_numbers = b'{"features": [' + b"0.12345678901234567," * (2 * 64 * N_FEATURES) + b"1]}"
    r = requests.post(net.url + "/predict", data=long_numbers, timeout=60)
    assert r.status_code == 400 and f"expected {N_FEATURES} features" in r.json()["error"]
    after = _worker_peak_rss_mb(net)
    # README "Limits": the worst request and the peak it costs; 512 MiB is the manifest's limit
    assert after < before + 64, (before, after)
    print(f"worker peak RSS: {before:.0f} MB before, {after:.0f} MB after the worst requests")
    assert requests.post(net.url + "/predict", json=BODY).status_code == 200


def test_many_headers_and_long_lines_are_refused_as_json(net: LiveServer) -> None:
    with _connect(net) as sock:
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        status, head, body = _read_response(sock)
    assert status == 431 and head["content-type"] == "application/json"
    assert "header" in orjson.loads(body)["error"].lower()


def test_sync_workers_remain_available(tmp_path: Path) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx")
    server = start_server(
        [str(model), "--workers", "1", "--worker-class", "sync", "--body-timeout", "1"],
        tmp_path / "serve.log",
        {},
    )
    try:
        assert requests.post(server.url + "/predict", json=BODY).status_code == 200
        assert "Using worker: sync" in server.log()
        with _connect(server) as sock:  # the body deadline holds under sync workers too
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            status, _, _ = _read_response(sock)
        assert status == 408
    finally:
        assert stop_server(server) == 0
