"""Helpers for the service tests: small ONNX classifiers built with onnx.helper, starting /
stopping a real `bnserve serve` process, and reading `bnserve predict`'s output files."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import requests
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[2]
N_FEATURES = 8
LABELS = ["cat", "dog", "bird"]
FEATURE_NAMES = [f"f{i}" for i in range(N_FEATURES)]
FOREIGN_FEATURES = 5
FOREIGN_CLASSES = 4
MAX_BATCH = 8
MAX_BODY_BYTES = 16 * 1024  # --max-body-mb 0.015625: small, so the 413 test sends little


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 9  # what onnxruntime >= 1.18 reads, whatever onnx writes by default
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_mlp_classifier(
    path: Path,
    seed: int = 0,
    n_features: int = N_FEATURES,
    hidden: int = 16,
    labels: list | None = LABELS,
    feature_names: list[str] | None = FEATURE_NAMES,
    metadata: dict[str, str] | None = None,
    logits_output: bool = True,
) -> Path:
    """Gemm-Relu-Gemm-Softmax with bnserve metadata, like the converter writes."""
    rng = np.random.default_rng(seed)
    n_classes = len(labels) if labels else 3
    w1 = rng.normal(size=(n_features, hidden)).astype(np.float32)
    b1 = rng.normal(size=hidden).astype(np.float32)
    w2 = rng.normal(size=(hidden, n_classes)).astype(np.float32)
    b2 = rng.normal(size=n_classes).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_classes])
    ]
    if logits_output:
        outputs.append(
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])
        )
    graph = helper.make_graph(
        nodes,
        "bn_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_features])],
        outputs,
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    props = {
        "bnserve.format_version": "1",
        "bnserve.output_kind": "probabilities",
        "bnserve.fold_report": json.dumps({"folded": 2, "max_abs_diff": 1.2e-7}),
        "bnserve.parity_report": json.dumps({"passed": True, "max_abs_diff": 3e-7}),
        "bnserve.source_sha256": "0" * 64,
        "bnserve.converter_version": "test",
    }
    if labels is not None:
        props["bnserve.labels"] = json.dumps(labels)
    if feature_names is not None:
        props["bnserve.feature_names"] = json.dumps(feature_names)
    props.update(metadata or {})
    helper.set_model_props(model, props)
    return _save(model, path)


def build_foreign_logits(path: Path, seed: int = 5) -> Path:
    """A classifier from "another framework": MatMul + Add, one logits output, no metadata."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FOREIGN_FEATURES, FOREIGN_CLASSES)).astype(np.float32) * 3
    b = rng.normal(size=FOREIGN_CLASSES).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["scores"]),
        ],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FOREIGN_FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", FOREIGN_CLASSES])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


COLUMN_LABELS = ["Adelie", "Gentoo"]
ISLANDS = ["Biscoe", "Dream"]


def build_column_classifier(path: Path, seed: int = 3) -> Path:
    """A raw-column model as the converter writes one (one input per table column, described in
    `bnserve.preprocessing`), small enough to build by hand: `island` categorical (string
    [batch, 1], one-hot over ISLANDS, anything else sets no column), `bill` numeric (float
    [batch, 1], NaN = missing, imputed with 40 and flagged), then Gemm + Softmax."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, len(COLUMN_LABELS))).astype(np.float32)
    b = rng.normal(size=len(COLUMN_LABELS)).astype(np.float32)
    nodes = []
    for i in range(len(ISLANDS)):
        nodes += [
            helper.make_node("Equal", ["island", f"is{i}"], [f"eq{i}"]),
            helper.make_node("Cast", [f"eq{i}"], [f"oh{i}"], to=TensorProto.FLOAT),
        ]
    nodes += [
        helper.make_node("IsNaN", ["bill"], ["nan"]),
        helper.make_node("Where", ["nan", "fill", "bill"], ["bill_filled"]),
        helper.make_node("Cast", ["nan"], ["bill_missing"], to=TensorProto.FLOAT),
        helper.make_node(
            "Concat", ["oh0", "oh1", "bill_filled", "bill_missing"], ["features"], axis=1
        ),
        helper.make_node("Gemm", ["features", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    consts = [
        helper.make_tensor(f"is{i}", TensorProto.STRING, [], [island.encode()])
        for i, island in enumerate(ISLANDS)
    ]
    consts += [
        numpy_helper.from_array(np.array(40.0, np.float32), "fill"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "columns",
        [
            helper.make_tensor_value_info("island", TensorProto.STRING, ["batch", 1]),
            helper.make_tensor_value_info("bill", TensorProto.FLOAT, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    spec = {
        "missing_values": ["", "NA"],
        "columns": [
            {"name": "island", "kind": "categorical", "categories": ISLANDS},
            {"name": "bill", "kind": "numeric", "missing": True},
        ],
    }
    helper.set_model_props(
        model,
        {
            "bnserve.format_version": "1",
            "bnserve.output_kind": "probabilities",
            "bnserve.labels": json.dumps(COLUMN_LABELS),
            "bnserve.preprocessing": json.dumps(spec),
        },
    )
    return _save(model, path)


def v2_request(rows: np.ndarray, name: str = "input", **extra: object) -> dict:
    """A V2 infer request body with `rows` as one FP32 JSON tensor."""
    tensor = {"name": name, "shape": list(rows.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": rows.ravel().tolist()}], **extra}


def reference_run(path: Path, x: np.ndarray, output: str | None = None) -> np.ndarray:
    """An in-process onnxruntime run, independent of service/, to compare HTTP answers with."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = output or session.get_outputs()[0].name
    return session.run([name], {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def read_predictions(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Header, labels, class indices and probabilities of a CSV or Parquet output."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        probs = np.column_stack([table.column(i).to_numpy() for i in range(2, table.num_columns)])
        return (
            table.column_names,
            table.column("label").to_pylist(),
            table.column("class_index").to_numpy(),
            probs.reshape(table.num_rows, -1).astype(np.float32),
        )
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]], dtype=np.float32)
    index = np.array([int(r[1]) for r in rows[1:]], dtype=np.int64)
    return rows[0], [r[0] for r in rows[1:]], index, probs.reshape(len(rows) - 1, -1)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """A running `bnserve serve` process (the gunicorn master) and where it listens."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    grpc_port: int = 0  # 0: no gRPC server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def listening_ports(self) -> set[int]:
        """The TCP ports the master and its workers listen on (their sockets in LISTEN state)."""
        inodes = set()
        for pid in [self.proc.pid, *self.children()]:
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = os.readlink(fd)
                        if target.startswith("socket:["):
                            inodes.add(target[8:-1])
        ports = set()
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[int, bytes]:
        """The master's child processes and their command lines (empty for one exited and not
        yet reaped)."""
        listed = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        found = {}
        for pid in listed.split():
            try:
                found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # exited meanwhile
                continue
        return found

    def grpc_pids(self) -> list[int]:
        """The gRPC processes (python -m bnserve.service.grpc_server)."""
        return [pid for pid, cmdline in self.children().items() if b"grpc_server" in cmdline]

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the children that run the master's command line (forked, not
        exec'd), so neither a reload runner nor an exited child waiting to be reaped counts."""
        master = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes()
        return [pid for pid, cmdline in self.children().items() if cmdline == master]


def python_path() -> str:
    """PYTHONPATH for a child `python -m bnserve`: this checkout, after any PYTHONPATH already
    set (a run that points the package at another copy of the code keeps doing so)."""
    return os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO_ROOT)) if p)


def start_server(
    args: list[str], log_path: Path, env_extra: dict[str, str], grpc: bool = False
) -> LiveServer:
    """Start `python -m bnserve serve ARGS` and wait until /v2/health/ready answers 200.

    gRPC: on a free port with `grpc`, else off (`--grpc-port 0`: servers running side by side
    must not share the default port), unless ARGS or the environment name a port."""
    port = int(env_extra.get("BNSERVE_PORT") or free_port())
    if "BNSERVE_PORT" not in env_extra:
        args = [*args, "--port", str(port)]
    if "--grpc-port" in args:
        grpc_port = int(args[args.index("--grpc-port") + 1])
    elif "BNSERVE_GRPC_PORT" in env_extra:
        grpc_port = int(env_extra["BNSERVE_GRPC_PORT"])
    else:
        grpc_port = free_port() if grpc else 0
        args = [*args, "--grpc-port", str(grpc_port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(env_extra)
    env["PYTHONPATH"] = python_path()
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnserve", "serve", *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO_ROOT,
    )
    server = LiveServer(proc, port, log_path, grpc_port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bnserve serve exited with {proc.returncode}:\n{server.log()}")
        try:  # the master accepts connections before a worker has loaded the models
            ready = requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
            if ready and (grpc_port == 0 or grpc_listening(server, deadline)):
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"bnserve serve not ready after 60 s:\n{server.log()}")


def grpc_listening(server: LiveServer, deadline: float) -> bool:
    """Whether a gRPC process accepts connections (it binds once its models are loaded)."""
    import grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            return False
    return True


def stop_server(server: LiveServer) -> int:
    """SIGTERM to the PID (the gunicorn master); kill only if it does not stop in time."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode
