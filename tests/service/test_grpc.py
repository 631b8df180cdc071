"""The Open Inference Protocol over gRPC against live `bnserve serve` processes (the gunicorn
master, its gevent workers and its gRPC processes), with the real `tritonclient.grpc` client
(and its own generated stubs where a request needs typed contents, which tritonclient never
sends): every method, errors and their status codes, auth, model control, a raw-column model,
and the gRPC processes' lifecycle (restart, drain, stop, a killed master)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as tg
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.service.production import metrics, sample, wait_for
from tests.service.support import (
    COLUMN_LABELS,
    LABELS,
    MAX_BATCH,
    MAX_BODY_BYTES,
    N_FEATURES,
    LiveServer,
    build_column_classifier,
    build_mlp_classifier,
    reference_run,
    start_server,
    stop_server,
    v2_request,
)

TOKEN = "grpc-test-token-0123"
GRPC_X2 = ("--workers", "2", "--grpc-workers", "2")
AUTH = {"authorization": f"Bearer {TOKEN}"}
HTTP_AUTH = {"Authorization": f"Bearer {TOKEN}"}
X = np.random.default_rng(7).normal(size=(3, N_FEATURES)).astype(np.float32)


def client(live: LiveServer) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(live.grpc_url)


def raw_input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> tg.InferInput:
    tensor = tg.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def status(call, *args, **kwargs) -> tuple[str, str]:
    """(status code name, message) of a tritonclient call that must fail."""
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value.status().removeprefix("StatusCode."), caught.value.message()


def stub(live: LiveServer) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(live.grpc_url))


def typed_request(x: np.ndarray, **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="clf", **fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def reshape(tensor, shape: list[int]) -> None:
    del tensor.shape[:]
    tensor.shape.extend(shape)


SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"  # HealthCheckResponse.status, field 1


def health(live: LiveServer, service: str = "") -> tuple[str, bytes]:
    """(status code name, response bytes) of grpc.health.v1.Health/Check on a plain channel,
    the messages written and read by hand after gRPC's published health.proto (field 1 of each:
    the service name, the status), not with bnserve's own definitions."""
    request = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
    with grpc.insecure_channel(live.grpc_url) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            return "OK", check(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name, b""


def configs(
    live: LiveServer, model: str, version: str = "", headers: dict | None = None
) -> tuple[dict, dict]:
    """(the gRPC ModelConfig as tritonclient's `as_json` writes it, the HTTP `/config` JSON read
    through tritonclient's ModelConfig message and written the same way: MessageToJson writes
    int64 values as strings, so the two documents compare field by field)."""
    got = client(live).get_model_config(model, version, headers=headers, as_json=True)["config"]
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/config"
    answer = requests.get(live.url + path, headers=headers, timeout=5)
    answer.raise_for_status()
    http = answer.json()
    message = json_format.ParseDict(http, model_config_pb2.ModelConfig())
    as_json = json_format.MessageToDict(message, preserving_proto_field_name=True)
    assert as_json.keys() == http.keys()  # nothing the HTTP document holds is left out
    return got, as_json


# --- the shared session server: repository, model control none, no token ---------------------


def test_health_and_metadata(server: LiveServer) -> None:
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("clf") and c.is_model_ready("clf", "1") and c.is_model_ready("foreign")
    meta = c.get_server_metadata()
    http = requests.get(server.url + "/v2", timeout=5).json()
    assert (meta.name, meta.version, list(meta.extensions)) == (
        http["name"],
        http["version"],
        http["extensions"],
    )
    model = c.get_model_metadata("clf")
    assert (model.name, list(model.versions), model.platform) == (
        "clf",
        ["1", "2", "10"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("input", "FP32", [-1, N_FEATURES])
    ]
    assert [t.name for t in model.outputs] == ["probabilities", "logits"]
    assert status(c.is_model_ready, "nope")[0] == "NOT_FOUND"
    assert status(c.is_model_ready, "clf", "3")[0] == "NOT_FOUND"  # a folder without a model
    code, message = status(c.get_model_metadata, "clf", "7")
    assert code == "NOT_FOUND" and "has no version '7'" in message


def test_infer_raw_contents_match_onnxruntime(server: LiveServer, model_repo: Path) -> None:
    c = client(server)
    result = c.infer("clf", [raw_input(X)], request_id="req-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("clf", "10", "req-1")
    assert len(response.raw_output_contents) == 2  # raw in, raw out: what tritonclient reads
    expected = reference_run(model_repo / "clf" / "10" / "model.onnx", X, "probabilities")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6)
    logits = reference_run(model_repo / "clf" / "10" / "model.onnx", X, "logits")
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-6)
    one = c.infer(
        "clf", [raw_input(X)], model_version="1", outputs=[tg.InferRequestedOutput("logits")]
    )
    assert [o.name for o in one.get_response().outputs] == ["logits"]
    first = reference_run(model_repo / "clf" / "1" / "model.onnx", X, "logits")
    np.testing.assert_allclose(one.as_numpy("logits"), first, rtol=1e-5, atol=1e-6)
    # FP64 in: converted as HTTP converts it
    wide = c.infer("clf", [raw_input(X.astype(np.float64), datatype="FP64")])
    np.testing.assert_allclose(wide.as_numpy("probabilities"), expected, rtol=1e-6)


def test_typed_contents_answer_typed_contents(server: LiveServer, model_repo: Path) -> None:
    response = stub(server).ModelInfer(typed_request(X, id="typed"))
    assert response.id == "typed" and not response.raw_output_contents
    by_name = {o.name: o for o in response.outputs}
    probabilities = by_name["probabilities"]
    assert (probabilities.datatype, list(probabilities.shape)) == ("FP32", [3, 3])
    got = np.array(probabilities.contents.fp32_contents, np.float32).reshape(3, 3)
    expected = reference_run(model_repo / "clf" / "10" / "model.onnx", X, "probabilities")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # the binary_data_output parameter asks for raw outputs whatever the inputs were
    request = typed_request(X)
    request.parameters["binary_data_output"].bool_param = True
    assert len(stub(server).ModelInfer(request).raw_output_contents) == 2


def test_classification_as_the_http_api_answers_it(server: LiveServer) -> None:
    wanted = [tg.InferRequestedOutput("probabilities", class_count=2)]
    got = client(server).infer("clf", [raw_input(X)], outputs=wanted).as_numpy("probabilities")
    outputs = [{"name": "probabilities", "parameters": {"classification": 2}}]
    body = v2_request(X, outputs=outputs)
    http = requests.post(server.url + "/v2/models/clf/infer", json=body, timeout=5).json()
    assert got.shape == (3, 2)
    assert [s.decode() for s in got.ravel()] == http["outputs"][0]["data"]
    request = typed_request(X)
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    typed = stub(server).ModelInfer(request).outputs[0]
    assert typed.datatype == "BYTES" and list(typed.shape) == [3, 2]
    assert [s.decode() for s in typed.contents.bytes_contents] == http["outputs"][0]["data"]


def test_standard_health_check(server: LiveServer) -> None:
    assert health(server) == ("OK", SERVING)
    assert health(server, "inference.GRPCInferenceService") == ("OK", SERVING)
    assert health(server, "no.such.Service")[0] == "NOT_FOUND"
    with grpc.insecure_channel(server.grpc_url) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        with pytest.raises(grpc.RpcError) as caught:
            next(watch(b"", timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_model_config_is_the_http_config(server: LiveServer) -> None:
    got, http = configs(server, "clf")
    assert got == http
    assert (got["name"], got["platform"], got["backend"]) == (
        "clf",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert got["max_batch_size"] == MAX_BATCH
    assert got["version_policy"] == {"specific": {"versions": ["1", "2", "10"]}}
    assert got["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [str(N_FEATURES)]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in got["output"]] == [
        ("probabilities", "TYPE_FP32", [str(len(LABELS))]),
        ("logits", "TYPE_FP32", [str(len(LABELS))]),
    ]
    assert got["parameters"]["default_version"] == {"string_value": "10"}
    assert json.loads(got["parameters"]["labels"]["string_value"]) == LABELS
    # the protobuf message tritonclient returns without as_json: Triton's own type
    message = client(server).get_model_config("clf").config
    assert message.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(message.version_policy.specific.versions) == [1, 2, 10]


@pytest.mark.parametrize(("model", "version"), [("clf", "1"), ("clf", "10"), ("foreign", "1")])
def test_model_config_of_a_version(server: LiveServer, model: str, version: str) -> None:
    got, http = configs(server, model, version)
    assert got == http and got["name"] == model


def test_model_config_of_unknown_models_and_versions(server: LiveServer) -> None:
    c = client(server)
    code, message = status(c.get_model_config, "nope")
    assert code == "NOT_FOUND" and "unknown model 'nope'" in message
    code, message = status(c.get_model_config, "clf", "7")
    assert code == "NOT_FOUND" and "has no version '7'" in message
    assert status(c.get_model_config, "clf", "3")[0] == "NOT_FOUND"  # a folder without a model


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (lambda r: setattr(r.inputs[0], "name", "x"), "INVALID_ARGUMENT", "unexpected input 'x'"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 4), "INVALID_ARGUMENT", "holds 32 values"),
        (lambda r: reshape(r.inputs[0], [4, 6]), "INVALID_ARGUMENT", "expected shape [batch, 8]"),
        (
            lambda r: r.inputs[0].contents.fp32_contents.__setitem__(0, float("nan")),
            "INVALID_ARGUMENT",
            "finite",
        ),
        (
            lambda r: r.inputs[0].contents.int_contents.append(1),
            "INVALID_ARGUMENT",
            "not int_contents",
        ),
        (lambda r: r.raw_input_contents.append(b"\0" * 4), "INVALID_ARGUMENT", "typed contents"),
        (lambda r: r.outputs.add(name="nope"), "INVALID_ARGUMENT", "unknown output 'nope'"),
        (lambda r: setattr(r, "model_name", "nope"), "NOT_FOUND", "unknown model 'nope'"),
        (lambda r: setattr(r, "model_version", "4"), "NOT_FOUND", "has no version '4'"),
    ],
    ids=[
        "input-name",
        "count",
        "shape",
        "nan",
        "wrong-contents",
        "raw-and-typed",
        "unknown-output",
        "unknown-model",
        "unknown-version",
    ],
)
def test_bad_requests_map_to_status_codes(
    server: LiveServer, change, code: str, message: str
) -> None:
    request = typed_request(X)
    change(request)
    try:
        stub(server).ModelInfer(request)
        got, details = "OK", ""
    except grpc.RpcError as exc:
        got, details = exc.code().name, exc.details()
    assert got == code and message in details


def test_limits_are_resource_exhausted(server: LiveServer) -> None:
    c = client(server)
    rows = np.zeros((MAX_BATCH + 1, N_FEATURES), np.float32)
    code, message = status(c.infer, "clf", [raw_input(rows)])
    assert code == "RESOURCE_EXHAUSTED" and f"at most {MAX_BATCH} per request" in message
    big = np.zeros((1, MAX_BODY_BYTES // 4 + 16), np.float32)  # over --max-body-mb: grpc refuses
    code, _ = status(c.infer, "clf", [raw_input(big)])
    assert code == "RESOURCE_EXHAUSTED"
    code, message = status(
        c.infer, "clf", [raw_input(X)], outputs=[tg.InferRequestedOutput("logits", class_count=9)]
    )
    assert code == "INVALID_ARGUMENT" and "classification must be an integer from 1 to 3" in message


def test_model_control_none_is_permission_denied(server: LiveServer) -> None:
    c = client(server)
    for call in (c.load_model, c.unload_model):
        code, message = status(call, "clf")
        assert code == "PERMISSION_DENIED" and "--model-control explicit" in message
    index = c.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} >= {
        ("clf", "1", "READY"),
        ("clf", "10", "READY"),
        ("foreign", "1", "READY"),
    }


def test_grpc_calls_are_counted_and_logged(server: LiveServer) -> None:
    before = metrics(server.url)
    c = client(server)
    c.infer("clf", [raw_input(X)])
    status(c.is_model_ready, "nope")
    after = metrics(server.url)

    def delta(**labels: str) -> float:
        name = "bnserve_grpc_requests_total"
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta(method="ModelInfer", code="OK") == 1
    assert delta(method="ModelReady", code="NOT_FOUND") == 1
    log = server.log()
    assert '"path":"/inference.GRPCInferenceService/ModelInfer"' in log
    assert '"status":"NOT_FOUND"' in log and '"protocol":"grpc"' in log


def test_a_malformed_message_is_invalid_argument_counted_and_logged(server: LiveServer) -> None:
    """Bytes that are no ModelInferRequest are the client's error, not the server's: grpc's own
    deserializer would answer INTERNAL before any handler, uncounted and unlogged."""
    before = metrics(server.url)
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for payload in (b"\xff\xff\xff\xff", b"\x12" + b"\x80" * 20):  # bad tag, overlong varint
            with pytest.raises(grpc.RpcError) as caught:
                infer(payload, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid inference.ModelInferRequest message" in caught.value.details()
    after = metrics(server.url)
    name = "bnserve_grpc_requests_total"
    labels = {"method": "ModelInfer", "code": "INVALID_ARGUMENT"}
    assert sample(after, name, **labels) - sample(before, name, **labels) == 2
    assert client(server).infer("clf", [raw_input(X)]).as_numpy("probabilities").shape == (3, 3)


def test_only_the_grpc_process_loads_grpc(server: LiveServer) -> None:
    """grpc starts threads: neither the gunicorn master (its forked workers would inherit them)
    nor the gevent workers load it; the gRPC process, a fresh interpreter, serves it."""
    maps = lambda pid: Path(f"/proc/{pid}/maps").read_text()  # noqa: E731
    assert "cygrpc" not in maps(server.proc.pid)
    workers = server.worker_pids()
    assert len(workers) == 2 and not any("cygrpc" in maps(pid) for pid in workers)
    (grpc_pid,) = server.grpc_pids()
    assert "cygrpc" in maps(grpc_pid)
    assert server.listening_ports() == {server.port, server.grpc_port}


def test_request_id_metadata_is_echoed(server: LiveServer) -> None:
    call = stub(server).ServerLive.with_call(
        service_pb2.ServerLiveRequest(), metadata=(("x-request-id", "trace-42"),)
    )
    assert ("x-request-id", "trace-42") in call[1].initial_metadata()


def test_environment_variable_sets_the_grpc_port(env_server: LiveServer) -> None:
    assert env_server.listening_ports() == {env_server.port, env_server.grpc_port}
    c = client(env_server)
    assert c.is_model_ready("foreign_single")


def test_grpc_port_zero_disables_it(model_repo: Path, tmp_path: Path) -> None:
    live = start_server(
        [str(model_repo / "foreign" / "1" / "model.onnx"), "--workers", "1", "--grpc-port", "0"],
        tmp_path / "serve.log",
        {},
    )
    try:
        assert live.listening_ports() == {live.port}
    finally:
        stop_server(live)


def test_sigterm_drains_and_stops_the_grpc_process(model_repo: Path, tmp_path: Path) -> None:
    model = model_repo / "clf" / "1" / "model.onnx"
    args = [str(model), "--model-name", "clf", "--workers", "1", "--drain-seconds", "2"]
    live = start_server(args, tmp_path / "serve.log", {}, grpc=True)
    try:
        (grpc_pid,) = live.grpc_pids()
        c = client(live)
        assert c.is_server_ready()
        live.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: not c.is_server_ready(), timeout=5)  # it follows the state
        assert health(live) == ("OK", NOT_SERVING)  # draining: the standard check says so too
        assert c.infer("clf", [raw_input(X)]).as_numpy("probabilities").shape == (3, 3)
        c.close()
        assert live.proc.wait(timeout=30) == 0
        assert gone(grpc_pid)  # stopped with the workers
    finally:
        stop_server(live)


def test_a_grpc_process_does_not_outlive_a_killed_master(model_repo: Path, tmp_path: Path) -> None:
    model = model_repo / "foreign" / "1" / "model.onnx"
    live = start_server([str(model), "--workers", "1"], tmp_path / "serve.log", {}, grpc=True)
    (grpc_pid,) = live.grpc_pids()
    live.proc.kill()  # no stop for the children: they must notice the master is gone
    live.proc.wait()
    assert wait_for(lambda: gone(grpc_pid), timeout=10)
    assert "the gunicorn master is gone" in live.log()


def test_a_frozen_grpc_process_is_killed_and_replaced(model_repo: Path, tmp_path: Path) -> None:
    """A gRPC process that takes no work for --timeout seconds (here frozen by SIGSTOP; every
    thread stuck in a call looks the same to the master) is killed and a new one serves."""
    model = model_repo / "clf" / "1" / "model.onnx"
    args = [str(model), "--model-name", "clf", "--workers", "1", "--timeout", "2"]
    live = start_server(args, tmp_path / "serve.log", {}, grpc=True)
    try:
        (frozen,) = live.grpc_pids()
        with tg.InferenceServerClient(live.grpc_url) as c:
            assert c.is_model_ready("clf")
        os.kill(frozen, signal.SIGSTOP)
        assert wait_for(lambda: set(live.grpc_pids()) - {frozen}, timeout=20)
        assert wait_for(lambda: gone(frozen), timeout=10)
        with tg.InferenceServerClient(live.grpc_url) as c:
            assert wait_for(lambda: _ready(c), timeout=20)
            assert c.infer("clf", [raw_input(X)]).as_numpy("probabilities").shape == (3, 3)
        assert f"gRPC process {frozen} took no work for" in live.log()
        # while the new one serves, the master leaves it alone: it touches its heartbeat
        (serving,) = live.grpc_pids()
        assert not wait_for(lambda: serving not in live.grpc_pids(), timeout=4)
    finally:
        with contextlib.suppress(OSError):
            os.kill(frozen, signal.SIGCONT)
        stop_server(live)


def test_calls_beyond_grpc_max_calls_are_refused_at_once(model_repo: Path, tmp_path: Path) -> None:
    """A flood of calls does not queue without bound: beyond --grpc-max-calls held at once,
    grpc refuses with RESOURCE_EXHAUSTED; the calls it holds are answered."""
    model = model_repo / "clf" / "1" / "model.onnx"
    args = [str(model), "--model-name", "clf", "--workers", "1", "--grpc-max-calls", "1"]
    live = start_server([*args, "--max-batch", "400000"], tmp_path / "serve.log", {}, grpc=True)
    try:
        rows = np.random.default_rng(0).normal(size=(400_000, N_FEATURES)).astype(np.float32)
        request = service_pb2.ModelInferRequest(model_name="clf")
        request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
        request.raw_input_contents.append(rows.tobytes())  # tens of ms a call
        unlimited = [("grpc.max_receive_message_length", -1)]  # answers of 9.6 MB
        channel = grpc.insecure_channel(live.grpc_url, options=unlimited)
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        calls = [infer.future(request, timeout=60) for _ in range(12)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
        refused = next(c for c in calls if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "limit" in refused.details().lower()
        channel.close()
    finally:
        stop_server(live)


def test_connections_are_closed_at_their_max_age_and_clients_reconnect(
    model_repo: Path, tmp_path: Path
) -> None:
    """--grpc-max-connection-age: one long-lived client channel is moved to new connections
    (its calls arrive from new client ports), and no call fails on the way."""
    model = model_repo / "clf" / "1" / "model.onnx"
    args = [str(model), "--model-name", "clf", "--workers", "1", "--grpc-max-connection-age", "1"]
    live = start_server(args, tmp_path / "serve.log", {}, grpc=True)
    try:
        with tg.InferenceServerClient(live.grpc_url) as c:
            deadline = time.monotonic() + 4.5
            while time.monotonic() < deadline:
                assert c.infer("clf", [raw_input(X)]).as_numpy("probabilities").shape == (3, 3)
                time.sleep(0.1)

        def peers() -> set[str]:
            lines = [json.loads(line) for line in live.log().splitlines() if '"grpc"' in line]
            return {line["peer"] for line in lines if line["path"].endswith("/ModelInfer")}

        assert wait_for(lambda: len(peers()) >= 3, timeout=5), peers()
        assert all(p.startswith("127.0.0.1:") for p in peers())
    finally:
        stop_server(live)


def _ready(c: tg.InferenceServerClient) -> bool:
    try:
        return c.is_model_ready("clf")
    except InferenceServerException:
        return False


def gone(pid: int) -> bool:
    """Exited: reaped, or a zombie (its command line reads empty)."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


# --- explicit model control, a token, a raw-column model ---------------------------------------


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("grpc_control")
    repo = tmp / "repo"
    build_mlp_classifier(repo / "clf" / "1" / "model.onnx", seed=1)
    build_mlp_classifier(repo / "spare" / "1" / "model.onnx", seed=2)
    build_column_classifier(repo / "penguin" / "1" / "model.onnx")
    tokens = tmp / "tokens"
    tokens.write_text(TOKEN + "\n")
    live = start_server(
        [str(repo), *("--model-control", "explicit", "--token-file", str(tokens)), *GRPC_X2],
        tmp / "serve.log",
        {},
        grpc=True,
    )
    yield live
    stop_server(live)


def test_token_needed_except_for_health(control: LiveServer) -> None:
    c = client(control)
    assert c.is_server_live() and c.is_server_ready()  # open, as /v2/health/* are
    assert health(control) == ("OK", SERVING)
    for call, args in (
        (c.is_model_ready, ("clf",)),
        (c.get_server_metadata, ()),
        (c.get_model_repository_index, ()),
        (c.infer, ("clf", [raw_input(X)])),
        (c.get_model_config, ("clf",)),
        (c.load_model, ("clf",)),
    ):
        code, message = status(call, *args)
        assert code == "UNAUTHENTICATED" and "bearer token" in message
        code, _ = status(call, *args, headers={"authorization": "Bearer wrong-token-1234"})
        assert code == "UNAUTHENTICATED"
    assert c.is_model_ready("clf", headers=AUTH)
    assert c.infer("clf", [raw_input(X)], headers=AUTH).as_numpy("probabilities").shape == (3, 3)
    got, http = configs(control, "clf", headers=AUTH)
    assert got == http


def test_model_config_of_a_raw_column_model(control: LiveServer) -> None:
    got, http = configs(control, "penguin", "1", headers=AUTH)
    assert got == http
    assert [(i["name"], i["data_type"], i["dims"]) for i in got["input"]] == [
        ("island", "TYPE_STRING", ["1"]),
        ("bill", "TYPE_FP32", ["1"]),
    ]


def test_load_and_unload_follow_every_process(control: LiveServer) -> None:
    c = client(control)
    c.unload_model("spare", headers=AUTH)
    # new connections spread over both gRPC processes (SO_REUSEPORT): each follows the state
    for _ in range(6):
        with tg.InferenceServerClient(control.grpc_url) as other:
            code, message = status(other.is_model_ready, "spare", headers=AUTH)
            assert code == "NOT_FOUND" and "unloaded" in message
    http = requests.get(control.url + "/v2/models/spare/ready", headers=HTTP_AUTH, timeout=5)
    assert http.status_code == 404
    index = {m.name: m for m in c.get_model_repository_index(headers=AUTH).models}
    assert (index["spare"].state, index["spare"].reason) == ("UNAVAILABLE", "unloaded")
    c.load_model("spare", headers=AUTH)
    for _ in range(6):
        with tg.InferenceServerClient(control.grpc_url) as other:
            assert other.is_model_ready("spare", headers=AUTH)
    assert status(c.load_model, "missing", headers=AUTH)[0] == "NOT_FOUND"
    code, message = status(c.load_model, "spare", headers=AUTH, config="{}")
    assert code == "INVALID_ARGUMENT" and "unsupported load parameter(s) config" in message


def test_raw_column_model_with_bytes_inputs(control: LiveServer, tmp_path: Path) -> None:
    c = client(control)
    islands = np.array([["Biscoe"], ["Torgersen"], [""]], dtype=object)  # unseen, missing
    bills = np.array([[41.5], [np.nan], [38.0]], np.float32)  # NaN: missing
    inputs = [raw_input(islands, "island", "BYTES"), raw_input(bills, "bill", "FP32")]
    result = c.infer("penguin", inputs, headers=AUTH)
    path = build_column_classifier(tmp_path / "same.onnx")  # same seed: the same model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(["probabilities"], {"island": islands, "bill": bills})[0]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6)
    # typed contents: BYTES as bytes_contents, NaN in fp32_contents is missing
    request = service_pb2.ModelInferRequest(model_name="penguin")
    island = request.inputs.add(name="island", datatype="BYTES", shape=[3, 1])
    island.contents.bytes_contents.extend(s.encode() for s in islands.ravel())
    bill = request.inputs.add(name="bill", datatype="FP32", shape=[3])
    bill.contents.fp32_contents.extend(bills.ravel().tolist())
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 1
    response = stub(control).ModelInfer(request, metadata=tuple(AUTH.items()))
    best = [s.decode() for s in response.outputs[0].contents.bytes_contents]
    assert [b.rsplit(":", 1)[1] for b in best] == [COLUMN_LABELS[i] for i in expected.argmax(1)]
    # a number for a categorical column is refused as over HTTP
    island.datatype = "FP32"
    island.ClearField("contents")
    island.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(grpc.RpcError) as caught:
        stub(control).ModelInfer(request, metadata=tuple(AUTH.items()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a categorical column takes BYTES" in caught.value.details()


def test_a_dead_grpc_process_is_replaced(control: LiveServer) -> None:
    pids = control.grpc_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    assert wait_for(lambda: len(set(control.grpc_pids()) - set(pids)) == 1, timeout=30)
    for _ in range(6):  # whichever process a new connection reaches answers
        with tg.InferenceServerClient(control.grpc_url) as other:
            assert other.is_model_ready("clf", headers=AUTH)
    assert f"gRPC process {pids[0]} exited" in control.log()
