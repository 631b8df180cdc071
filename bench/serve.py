"""Serving benchmark: `bnserve serve` (metrics, request ids, JSON access log on) against the usual
minimal Flask `/predict` app (bench/flask_baseline.py), both under gunicorn with 2 sync workers
and one single-threaded onnxruntime session per worker, on a folded 64-256-256-10 MLP.

Each round loads each server at 1 and 8 concurrent connections with `wrk` (a Lua script POSTs one
example) or, without wrk, a bounded Python client; only 127.0.0.1 is contacted. Printed per
server and concurrency: req/s, p50/p99 latency and server CPU milliseconds per request (master +
workers, from /proc), the medians over the rounds, and the product's ratios to the baseline,
measured in the same run (the machine is shared: compare ratios, not absolute figures).

    python bench/serve.py            # 3 rounds of 10 s
    python bench/serve.py --quick    # 3 rounds of 3 s
"""

from __future__ import annotations

import argparse
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str], log: Path):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{log.read_text()[-3000:]}")
            try:
                status, _ = post(port, BODY)
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


def post(port: int, body: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - start
    finally:
        conn.close()


def load_wrk(port: int, connections: int, seconds: float, script: Path) -> dict:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/predict",
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


def load_python(port: int, connections: int, seconds: float) -> dict:
    """Bounded fallback client: `connections` threads, each one request at a time."""
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker() -> None:
        mine, bad = [], 0
        for _ in range(1_000_000):
            if time.monotonic() >= deadline:
                break
            try:
                status, elapsed = post(port, BODY)
            except OSError:
                bad += 1
                continue
            if status != 200:
                bad += 1
            mine.append(elapsed)
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)],
        "errors": errors[0],
    }


def measure(server: Server, connections: int, seconds: float, script: Path | None) -> dict:
    cpu0 = server.cpu_seconds()
    if script is not None:
        result = load_wrk(server.port, connections, seconds, script)
    else:
        result = load_python(server.port, connections, seconds)
    cpu = server.cpu_seconds() - cpu0
    result["cpu_ms"] = 1e3 * cpu / max(1, result["requests"])
    return result


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except (OSError, AttributeError):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    global BODY
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="3 s rounds")
    p.add_argument("--python-client", action="store_true", help="do not use wrk")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    seconds = 3.0 if args.quick else args.seconds

    tmp = Path(tempfile.mkdtemp(prefix="bnserve-bench-"))
    model = build_model(tmp / "mlp.onnx")
    x = np.random.default_rng(1).normal(size=LAYERS[0]).round(4).tolist()
    BODY = json.dumps({"features": x}).encode()
    script = None
    if shutil.which("wrk") and not args.python_client:
        script = tmp / "post.lua"
        body = BODY.decode().replace('"', '\\"')
        script.write_text(
            f'wrk.method = "POST"\nwrk.body = "{body}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNSERVE_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["BENCH_MODEL"] = str(model)
    base_port, prod_port = free_port(), free_port()
    servers: list[Server] = []
    try:
        servers.append(
            Server(
                "flask baseline",
                [
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
                ],
                base_port,
                env,
                tmp / "baseline.log",
            )
        )
        servers.append(
            Server(
                "bnserve",
                [
                    sys.executable,
                    "-m",
                    "bnserve",
                    "serve",
                    str(model),
                    "--workers",
                    "2",
                    "--port",
                    str(prod_port),
                    "--log-level",
                    "info",
                ],
                prod_port,
                env,
                tmp / "bnserve.log",
            )
        )
        for server in servers:  # warm every worker
            for _ in range(200):
                post(server.port, BODY)
        print(
            f"machine: {machine()}; client: {'wrk -t1' if script else 'python threads'}; "
            f"{args.rounds} rounds of {seconds:g} s; load average before {os.getloadavg()}"
        )
        results: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for connections in (1, 8):
                for server in servers if r % 2 == 0 else servers[::-1]:
                    result = measure(server, connections, seconds, script)
                    results.setdefault((server.name, connections), []).append(result)
                    print(
                        f"  round {r + 1} {server.name:15s} c={connections}: "
                        f"{result['rps']:7.0f} req/s p50 {result['p50_ms']:.3f} ms "
                        f"p99 {result['p99_ms']:.3f} ms cpu {result['cpu_ms']:.3f} ms/req "
                        f"errors {result['errors']}",
                        flush=True,
                    )
        load = os.getloadavg()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, c)])

    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        "| server | conns | req/s | p50 ms | p99 ms | CPU ms/req | req/s ratio | p50 ratio | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    table = []
    for c in (1, 8):
        for name in ("flask baseline", "bnserve"):
            row = {k: med(name, c, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
            base = {k: med("flask baseline", c, k) for k in ("rps", "p50_ms", "cpu_ms")}
            ratio = (
                row["rps"] / base["rps"],
                row["p50_ms"] / base["p50_ms"],
                row["cpu_ms"] / base["cpu_ms"],
            )
            table.append({"server": name, "connections": c, **row, "ratios": ratio})
            print(
                f"| {name} | {c} | {row['rps']:.0f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
                f"| {row['cpu_ms']:.3f} | {ratio[0]:.2f}x | {ratio[1]:.2f}x | {ratio[2]:.2f}x |"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "load": load, "table": table}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
