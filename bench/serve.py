"""Serving benchmark: `bnserve serve` with its defaults (gevent workers; metrics, request ids and
JSON access log on) against the usual minimal Flask app (bench/flask_baseline.py: `/predict` and a
naive V2 infer) under `gunicorn -k sync -w 2`, both with one single-threaded onnxruntime session
per worker, on a folded 64-256-256-10 MLP.

Each round loads both servers with `wrk -t1` at 1, 8 and 64 connections, for `POST /predict` and
`POST /v2/models/mlp/infer`, with keep-alive connections and with a new connection per request
(`Connection: close`); only 127.0.0.1 is contacted. Printed: req/s and p50/p99 per cell, the
medians over the rounds and bnserve's ratios to the baseline measured in the same run (the
machine is shared: compare ratios, not absolute figures). Then the slow-client test: 50
connections that send their headers one line every 5 s, against the baseline, bnserve's default
and bnserve with `--worker-class sync`, while a normal client POSTs /predict every 100 ms.

    python bench/serve.py            # 3 rounds of 5 s per cell, then 20 s of slow clients
    python bench/serve.py --quick    # 2 rounds of 2 s

With `--grpc` it measures the Open Inference Protocol over gRPC instead: bnserve's default (2
gevent workers and one gRPC process) and `--grpc-workers 2`, each answering `POST
/v2/models/mlp/infer` (JSON, wrk, kept-alive connections) and gRPC `ModelInfer` (raw FP32
contents, as tritonclient.grpc sends them) from a closed-loop grpc.aio client with N concurrent
calls, each on its own HTTP/2 connection (like wrk's N connections). The two clients differ (wrk
is C, the gRPC client Python, both at the same nice level on the same machine), so the server
CPU per request (all of bnserve's processes) is the figure to compare across protocols.

    python bench/serve.py --grpc [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (64, 256, 256, 10)


def build_model(path: Path, seed: int = 0) -> Path:
    """A folded BN MLP as the converter writes it: Gemm/Relu layers, Softmax, bnserve metadata."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "input"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(LAYERS)):
        w = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = rng.normal(scale=0.1, size=n_out).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if i < len(LAYERS) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", LAYERS[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", LAYERS[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(
        model,
        {"bnserve.format_version": "1", "bnserve.output_kind": "probabilities"},
    )
    onnx.save(model, str(path))
    return path


def python_path() -> str:
    """PYTHONPATH for the servers and clients: this checkout, after any PYTHONPATH already set."""
    return os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        log: Path,
        ready_path: str = "/predict",
    ):
        self.name, self.port = name, port
        self.grpc_port = 0
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{log.read_text()[-3000:]}")
            try:
                status, _ = post(port, BODY, ready_path)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not answer within 60 s")

    def pids(self) -> list[int]:
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


BODY = b""
INFER_BODY = b""
CLIENT_PREFIX: list[str] = []  # ["nice", "-n", "10"] with --client-nice 10


def post(
    port: int, body: bytes, path: str = "/predict", timeout: float = 10.0
) -> tuple[int, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - start
    finally:
        conn.close()


def load_wrk(
    port: int, connections: int, seconds: float, script: Path, path: str = "/predict"
) -> dict:
    out = subprocess.run(
        [
            *CLIENT_PREFIX,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1)),
        "p99_ms": _ms(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1)),
        "errors": errors
        + (
            1
            if socket_errors
            and "connect 0, read 0, write 0, timeout 0" not in socket_errors.group(1)
            else 0
        ),
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def measure_route(
    server: Server, path: str, connections: int, seconds: float, script: Path
) -> dict:
    cpu0 = server.cpu_seconds()
    result = load_wrk(server.port, connections, seconds, script, path)
    result["cpu_ms"] = 1e3 * (server.cpu_seconds() - cpu0) / max(1, result["requests"])
    return result


def stop_all(servers: list[Server], tmp: Path) -> tuple[float, float, float]:
    """Stop the servers, remove the files; the load average (printed) before stopping."""
    load = os.getloadavg()
    for server in servers:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return load


def cell(results: dict[tuple, list[dict]], key: tuple) -> dict[str, float]:
    """req/s, p99 and CPU per request of one cell: medians over the rounds."""
    return {field: median(results, key, field) for field in ("rps", "p99_ms", "cpu_ms")}


def table_header(columns: str) -> None:
    """A Markdown table's header for comma-separated `columns`."""
    names = columns.split(", ")
    print("| " + " | ".join(names) + " |")
    print("|" + "---|" * len(names))


def median(results: dict[tuple, list[dict]], key: tuple, field: str) -> float:
    """The median of `field` over the rounds of one cell."""
    return statistics.median(r[field] for r in results[key])


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except (OSError, AttributeError):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} CPUs"


ROUTES = {"/predict": "simple", "/v2/models/mlp/infer": "v2"}
MODES = ("keep-alive", "new connection")


def wrk_script(path: Path, body: bytes, close: bool, paths: list[str] | None = None) -> Path:
    """A wrk Lua script POSTing `body`; `close` asks for a new connection per request; `paths`
    (when given) are requested in turn, one after the other, on each connection."""
    escaped = body.decode().replace('"', '\\"')
    lines = [
        'wrk.method = "POST"',
        f'wrk.body = "{escaped}"',
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if close:
        lines.append('wrk.headers["Connection"] = "close"')
    if paths:
        lines += [
            "paths = {" + ", ".join(f'"{p}"' for p in paths) + "}",
            "i = 0",
            "request = function()",
            "  i = i % #paths + 1",
            "  return wrk.format(nil, paths[i])",
            "end",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def slowloris(port: int, connections: int, seconds: float) -> dict:
    """`connections` clients send a request's headers one line every 5 s while a normal client
    POSTs /predict every 100 ms with a 1 s timeout; how many of its requests are answered."""
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(5.0):
            for sock in socks:
                with contextlib.suppress(OSError):  # closed by the server's deadline
                    sock.sendall(b"X-Slow: 1\r\n")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    answered, latencies, sent = 0, [], 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sent += 1
            try:
                status, elapsed = post(port, BODY, timeout=1.0)
                if status == 200:
                    answered += 1
                    latencies.append(elapsed)
            except OSError:
                pass
            time.sleep(0.1)
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    latencies.sort()
    return {
        "sent": sent,
        "answered": answered,
        "max_ms": 1e3 * latencies[-1] if latencies else None,
    }


def start_servers(tmp: Path, model: Path, env: dict[str, str]) -> list[Server]:
    base_port, prod_port, sync_port = free_port(), free_port(), free_port()
    baseline = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "2",
        "-k",
        "sync",
        "-b",
        f"127.0.0.1:{base_port}",
        "--control-socket",
        str(tmp / "ctl.sock"),
        "bench.flask_baseline:app",
    ]
    serve = [sys.executable, "-m", "bnserve", "serve", str(model), "--workers", "2"]
    serve += ["--grpc-port", "0"]
    return [
        Server("flask baseline", baseline, base_port, env, tmp / "baseline.log"),
        Server("bnserve", [*serve, "--port", str(prod_port)], prod_port, env, tmp / "b.log"),
        Server(
            "bnserve sync",
            [*serve, "--port", str(sync_port), "--worker-class", "sync"],
            sync_port,
            env,
            tmp / "bsync.log",
        ),
    ]


# --- gRPC ---------------------------------------------------------------------------------------

PROTOCOLS = ("http", "grpc")
GRPC_SERVERS = {  # name -> extra `bnserve serve` flags
    "default": ["--workers", "2"],
    "--grpc-workers 2": ["--workers", "2", "--grpc-workers", "2"],
}


def grpc_client(port: int, calls: int, seconds: float) -> dict:
    """Closed loop: `calls` concurrent ModelInfer calls, each on its own connection, for
    `seconds`; req/s, p50/p99 and errors (run in its own process: `--grpc-client`)."""
    import asyncio

    import grpc

    from bnserve.service import grpc_messages as pb

    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, LAYERS[0]])
    x = np.random.default_rng(1).normal(size=(1, LAYERS[0])).round(4).astype(np.float32)
    request.raw_input_contents.append(x.tobytes())
    path = f"/{pb.SERVICE.full_name}/ModelInfer"

    async def run() -> dict:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(calls)
        ]
        stubs = [
            c.unary_unary(
                path,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            for c in channels
        ]
        for stub in stubs:  # the gRPC process binds once it has loaded the model
            await stub(request, wait_for_ready=True, timeout=60)
        latencies: list[float] = []
        errors = 0
        loop = asyncio.get_running_loop()
        stop = loop.time() + seconds

        async def one(stub) -> None:
            nonlocal errors
            while loop.time() < stop:
                start = time.perf_counter()
                try:
                    await stub(request)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(one(stub) for stub in stubs))
        elapsed = time.perf_counter() - began
        for c in channels:
            await c.close()
        latencies.sort()
        return {
            "requests": len(latencies),
            "rps": len(latencies) / elapsed,
            "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)],
            "errors": errors,
        }

    return asyncio.run(run())


def load_grpc(server: Server, calls: int, seconds: float) -> dict:
    cpu0 = server.cpu_seconds()
    client = [sys.executable, __file__, "--grpc-client", str(server.grpc_port)]
    out = subprocess.run(
        [*CLIENT_PREFIX, *client, str(calls), str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
        env={**os.environ, "PYTHONPATH": python_path()},
    ).stdout
    result = json.loads(out)
    result["cpu_ms"] = 1e3 * (server.cpu_seconds() - cpu0) / max(1, result["requests"])
    return result


def grpc_main(args: argparse.Namespace, rounds: int, seconds: float, levels: list[int]) -> int:
    """gRPC ModelInfer against HTTP V2 infer on the same servers (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="bnserve-bench-grpc-"))
    model = build_model(tmp / "mlp.onnx")
    script = wrk_script(tmp / "v2.lua", INFER_BODY, close=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNSERVE_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = python_path()
    servers: list[Server] = []
    results: dict[tuple, list[dict]] = {}
    try:
        for i, (name, flags) in enumerate(GRPC_SERVERS.items()):
            port, grpc_port = free_port(), free_port()
            argv = [sys.executable, "-m", "bnserve", "serve", str(model), *flags]
            argv += ["--port", str(port), "--grpc-port", str(grpc_port)]
            server = Server(name, argv, port, env, tmp / f"grpc-{i}.log")
            server.grpc_port = grpc_port
            servers.append(server)
        for server in servers:  # warm every worker on both protocols
            for _ in range(200):
                post(server.port, INFER_BODY, "/v2/models/mlp/infer")
            load_grpc(server, 4, 1.0)
        print(
            f"machine: {machine()}; clients: wrk -t1 and a grpc.aio client at nice "
            f"{args.client_nice}; {rounds} rounds of {seconds:g} s; load average before "
            f"{os.getloadavg()}"
        )
        for r in range(rounds):
            for calls in levels:
                for server in servers if r % 2 == 0 else servers[::-1]:
                    for protocol in PROTOCOLS:
                        if protocol == "http":
                            result = measure_route(
                                server, "/v2/models/mlp/infer", calls, seconds, script
                            )
                        else:
                            result = load_grpc(server, calls, seconds)
                        results.setdefault((server.name, protocol, calls), []).append(result)
                        print(
                            f"  round {r + 1} {server.name:25s} {protocol:4s} c={calls:<3d} "
                            f"{result['rps']:7.0f} req/s p50 {result['p50_ms']:.3f} ms "
                            f"p99 {result['p99_ms']:.3f} ms cpu {result['cpu_ms']:.3f} ms/req "
                            f"errors {result['errors']}",
                            flush=True,
                        )
    finally:
        load = stop_all(servers, tmp)
    table = [
        {"server": s.name, "concurrent": c, **{p: cell(results, (s.name, p, c)) for p in PROTOCOLS}}
        for s in servers
        for c in levels
    ]
    table_header(
        "server, concurrent, HTTP V2 req/s, gRPC req/s, req/s ratio, HTTP p99 ms, gRPC p99 ms, "
        "HTTP CPU ms/req, gRPC CPU ms/req, CPU ratio"
    )
    for row in table:
        http, grpc_ = row["http"], row["grpc"]
        print(
            f"| {row['server']} | {row['concurrent']} | {http['rps']:.0f} | {grpc_['rps']:.0f} "
            f"| {grpc_['rps'] / http['rps']:.2f}x | {http['p99_ms']:.2f} "
            f"| {grpc_['p99_ms']:.2f} | {http['cpu_ms']:.3f} | {grpc_['cpu_ms']:.3f} "
            f"| {grpc_['cpu_ms'] / http['cpu_ms']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "load": load, "grpc": table}))
    return 0


def main(argv: list[str] | None = None) -> int:
    global BODY, INFER_BODY
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    p.add_argument("--connections", default="1,8,64", help="comma-separated (default 1,8,64)")
    p.add_argument("--slowloris-seconds", type=float, default=20.0)
    p.add_argument(
        "--client-nice",
        type=int,
        default=10,
        help="run wrk at this nice level (default 10; 0 = same priority as the servers). On a "
        "machine the client shares with the servers, a client at equal priority preempts "
        "busy workers: kept-alive connections then wait for their worker (the tail latency "
        "this measures is the client's, not the network's); nice 10 comes closer to a remote "
        "client. Both servers are measured the same way.",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--grpc", action="store_true", help="gRPC ModelInfer against HTTP V2 infer instead"
    )
    p.add_argument(
        "--grpc-client", nargs=3, metavar=("PORT", "CALLS", "SECONDS"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.grpc_client:
        port, calls, secs = args.grpc_client
        print(json.dumps(grpc_client(int(port), int(calls), float(secs))))
        return 0
    CLIENT_PREFIX[:] = ["nice", "-n", str(args.client_nice)] if args.client_nice else []
    rounds, seconds = (2, 2.0) if args.quick else (args.rounds, args.seconds)
    levels = [int(c) for c in args.connections.split(",")]
    if not shutil.which("wrk"):
        print("this benchmark needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2

    x = np.random.default_rng(1).normal(size=LAYERS[0]).round(4).tolist()
    BODY = json.dumps({"features": x}).encode()
    INFER_BODY = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, LAYERS[0]], "datatype": "FP32", "data": x}]}
    ).encode()
    if args.grpc:
        return grpc_main(args, rounds, seconds, levels)
    tmp = Path(tempfile.mkdtemp(prefix="bnserve-bench-"))
    model = build_model(tmp / "mlp.onnx")
    bodies = {"/predict": BODY, "/v2/models/mlp/infer": INFER_BODY}
    scripts = {
        (route, mode): wrk_script(
            tmp / f"{ROUTES[route]}-{i}.lua", bodies[route], mode == "new connection"
        )
        for route in ROUTES
        for i, mode in enumerate(MODES)
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNSERVE_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = python_path()
    env["BENCH_MODEL"] = str(model)
    servers: list[Server] = []
    results: dict[tuple, list[dict]] = {}
    try:
        servers = start_servers(tmp, model, env)
        compared = servers[:2]  # the baseline and bnserve's default
        for server in servers:  # warm every worker on both routes
            for _ in range(200):
                post(server.port, BODY)
                post(server.port, INFER_BODY, "/v2/models/mlp/infer")
        print(
            f"machine: {machine()}; client: wrk -t1 on the same machine at nice "
            f"{args.client_nice}; {rounds} rounds of "
            f"{seconds:g} s; load average before {os.getloadavg()}"
        )
        for r in range(rounds):
            for route, mode in scripts:
                for connections in levels:
                    for server in compared if r % 2 == 0 else compared[::-1]:
                        result = measure_route(
                            server, route, connections, seconds, scripts[(route, mode)]
                        )
                        key = (server.name, route, mode, connections)
                        results.setdefault(key, []).append(result)
                        print(
                            f"  round {r + 1} {server.name:15s} {route:22s} {mode:14s} "
                            f"c={connections:<3d} {result['rps']:7.0f} req/s "
                            f"p50 {result['p50_ms']:.3f} ms p99 {result['p99_ms']:.3f} ms "
                            f"errors {result['errors']}",
                            flush=True,
                        )
        print(
            f"\nslow clients: 50 connections sending headers one line per 5 s, for "
            f"{args.slowloris_seconds:g} s, while a client POSTs /predict every 100 ms"
        )
        slow = {}
        for server in servers:
            slow[server.name] = slowloris(server.port, 50, args.slowloris_seconds)
            print(f"  {server.name:15s} {slow[server.name]}", flush=True)
    finally:
        load = stop_all(servers, tmp)
    med = functools.partial(median, results)
    table_header(
        "route, connections, concurrent, baseline req/s, bnserve req/s, req/s ratio, "
        "baseline p99 ms, bnserve p99 ms, p99 ratio, CPU/request ratio"
    )
    table = []
    for route, mode in scripts:
        for c in levels:
            fields = ("rps", "p99_ms", "cpu_ms")
            base = {f: med(("flask baseline", route, mode, c), f) for f in fields}
            ours = {f: med(("bnserve", route, mode, c), f) for f in fields}
            row = {
                "route": route,
                "mode": mode,
                "connections": c,
                "baseline": base,
                "bnserve": ours,
                "rps_ratio": ours["rps"] / base["rps"],
                "p99_ratio": ours["p99_ms"] / base["p99_ms"],
                "cpu_ratio": ours["cpu_ms"] / base["cpu_ms"],
            }
            table.append(row)
            print(
                f"| {route} | {mode} | {c} | {base['rps']:.0f} | {ours['rps']:.0f} "
                f"| {row['rps_ratio']:.2f}x | {base['p99_ms']:.2f} | {ours['p99_ms']:.2f} "
                f"| {row['p99_ratio']:.2f}x | {row['cpu_ratio']:.2f}x |"
            )
    print("\n| server | slow-client test: answered | slowest answer ms |")
    print("|---|---|---|")
    for name, outcome in slow.items():
        slowest = f"{outcome['max_ms']:.1f}" if outcome["max_ms"] is not None else "-"
        print(f"| {name} | {outcome['answered']}/{outcome['sent']} | {slowest} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "load": load, "table": table, "slowloris": slow},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
