"""The gRPC protocol without a `bnserve serve` process: the descriptor set against its proto file,
wire compatibility with tritonclient's messages, the translation to the HTTP V2 path, the status
code table, and one worker's gRPC server in this process (states no healthy server reaches)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import orjson
import pytest
from google.protobuf import descriptor_pb2, json_format
from gunicorn.errors import HaltServer
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from bnserve import errors as base_errors
from bnserve.errors import UsageError
from bnserve.service import errors, grpc_api, v2
from bnserve.service import grpc_messages as pb
from bnserve.service.auth import BearerAuth
from bnserve.service.cli import check_grpc_port, config_from_args
from bnserve.service.config import ServiceConfig
from bnserve.service.gateway import Gateway
from bnserve.service.grpc_server import GrpcServer
from bnserve.service.gunicorn_conf import GrpcProcesses
from bnserve.service.registry import ModelRegistry
from bnserve.service.reload import ModelStore
from bnserve.service.repository import find_models
from tests.service.support import N_FEATURES, build_mlp_classifier, free_port

SERVICE_DIR = Path(pb.__file__).parent
X = np.random.default_rng(3).normal(size=(2, N_FEATURES)).astype(np.float32)


@pytest.mark.parametrize("proto_file", pb.PROTO_FILES)
def test_descriptor_set_is_the_compiled_proto_file(tmp_path: Path, proto_file: str) -> None:
    """scripts/grpc_codegen.sh was run after the last edit of the proto file."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "compiled.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{SERVICE_DIR}",
            f"--descriptor_set_out={out}",
            proto_file,
        ],
        check=True,
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    shipped = descriptor_pb2.FileDescriptorSet.FromString(
        pb.descriptor_set(proto_file).read_bytes()
    )
    assert compiled == shipped, "run scripts/grpc_codegen.sh"


def _fields(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict:
    """{message path: {field number: (name, type, label, type name)}} of a message and its
    nested messages (type names without their package)."""
    out = {
        prefix + message.name: {
            f.number: (f.name, f.type, f.label, f.type_name.removeprefix(".inference."))
            for f in message.field
        }
    }
    for nested in message.nested_type:
        out.update(_fields(nested, prefix + message.name + "."))
    return out


def test_wire_compatible_with_tritonclient() -> None:
    """Every message both files define agrees on each field number they share (name, type,
    label): what one side writes, the other reads. Every method is one of Triton's, with the
    same message types, under the same service name. Triton's messages come from two files:
    grpc_service.proto and the model_config.proto it imports (ModelConfig and its parts)."""
    ours, theirs = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    pb.FILE.CopyToProto(ours)
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    config = descriptor_pb2.FileDescriptorProto()
    model_config_pb2.DESCRIPTOR.CopyToProto(config)
    assert ours.package == theirs.package == config.package == "inference"
    mine = {k: v for m in ours.message_type for k, v in _fields(m).items()}
    triton = {
        k: v for m in [*theirs.message_type, *config.message_type] for k, v in _fields(m).items()
    }
    assert mine.keys() <= triton.keys()
    for name, fields in mine.items():
        shared = fields.keys() & triton[name].keys()
        assert {n: fields[n] for n in shared} == {n: triton[name][n] for n in shared}, name
        if name.endswith("Request") or name.endswith("Tensor") or "Parameter" in name:
            assert fields.keys() == triton[name].keys(), f"{name}: a field tritonclient sends"
    triton_enums = {e.name: {v.number: v.name for v in e.value} for e in config.enum_type}
    for enum in ours.enum_type:  # an enum travels as its number: the names must agree
        values = {v.number: v.name for v in enum.value}
        assert values.items() <= triton_enums[enum.name].items(), enum.name
    (service,) = ours.service
    triton_methods = {m.name: (m.input_type, m.output_type) for m in theirs.service[0].method}
    assert service.name == theirs.service[0].name == "GRPCInferenceService"
    for method in service.method:
        assert triton_methods[method.name] == (method.input_type, method.output_type)


def test_every_error_has_a_grpc_status() -> None:
    classes = [
        c
        for module in (base_errors, errors)
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, base_errors.BnserveError)
    ]
    for cls in classes:
        name = errors.grpc_status(cls.http_status)
        assert grpc.StatusCode[name] not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN), cls
    assert errors.grpc_status(403) == "PERMISSION_DENIED"
    assert errors.grpc_status(413) == "RESOURCE_EXHAUSTED"
    assert errors.grpc_status(503) == "UNAVAILABLE"


def test_only_the_health_methods_are_open() -> None:
    assert [m.path for m in grpc_api.METHODS if m.is_open(public_metrics=True)] == [
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/grpc.health.v1.Health/Check",
    ]


# --- translation to the HTTP path --------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> grpc_api.Worker:
    """clf/1 loads; clf/2 is not an ONNX file: a version that is not ready."""
    repo = tmp_path_factory.mktemp("grpc_repo")
    build_mlp_classifier(repo / "clf" / "1" / "model.onnx")
    (repo / "clf" / "2").mkdir()
    (repo / "clf" / "2" / "model.onnx").write_bytes(b"not onnx")
    registry = ModelRegistry(find_models(str(repo), None))
    registry.load_all("cpu", 1, "auto")
    return grpc_api.Worker(registry, ServiceConfig(model=str(repo), max_batch=4))


def request(x: np.ndarray, raw: bool, **fields) -> object:
    message = pb.ModelInferRequest(model_name="clf", model_version="1", **fields)
    tensor = message.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        message.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return message


def test_typed_raw_and_http_json_answer_the_same(worker: grpc_api.Worker) -> None:
    typed = grpc_api.model_infer(request(X, raw=False), worker)
    raw = grpc_api.model_infer(request(X, raw=True), worker)
    body = v2.dumps(
        {"inputs": [{"name": "input", "shape": [2, N_FEATURES], "datatype": "FP32", "data": X}]}
    )
    runtime = worker.registry.get("clf", "1")
    http = orjson.loads(v2.infer(runtime, body, None, worker.config)[0])
    for i, output in enumerate(http["outputs"]):
        from_typed = np.array(typed.outputs[i].contents.fp32_contents, np.float32)
        from_raw = np.frombuffer(raw.raw_output_contents[i], np.float32)
        assert typed.outputs[i].name == raw.outputs[i].name == output["name"]
        np.testing.assert_array_equal(from_typed, np.array(output["data"], np.float32))
        np.testing.assert_array_equal(from_raw, from_typed)
    assert not typed.raw_output_contents


def test_model_config_is_the_http_document(worker: grpc_api.Worker) -> None:
    """ModelConfig answers v2.triton_config, the HTTP route's document, read by tritonclient's
    own ModelConfig message: the same configuration over both protocols."""
    request = pb.message("ModelConfigRequest")(name="clf", version="1")
    wire = grpc_api.model_config(request, worker).SerializeToString()
    got = service_pb2.ModelConfigResponse.FromString(wire).config
    registry = worker.registry
    document = v2.triton_config(registry.model("clf"), registry.get("clf", "1"), 4)
    assert got == json_format.ParseDict(document, model_config_pb2.ModelConfig())
    assert got.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(got.input[0].dims) == [N_FEATURES] and got.max_batch_size == 4
    assert list(got.version_policy.specific.versions) == [1, 2]
    assert got.parameters["default_version"].string_value == "2"
    with pytest.raises(errors.NotFoundError, match="no version '5'"):
        grpc_api.model_config(pb.message("ModelConfigRequest")(name="clf", version="5"), worker)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (
            lambda r: r.raw_input_contents.extend([b"x", b"y"]),
            errors.BadRequestError,
            "2 entries for 1",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", "FP16"),
            errors.BadRequestError,
            "raw contents",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", "STRING"),
            errors.BadRequestError,
            "not supported",
        ),
        (lambda r: setattr(r, "model_version", "2"), errors.NotReadyError, "not ready"),
        (lambda r: setattr(r, "model_version", "5"), errors.NotFoundError, "no version '5'"),
    ],
)
def test_refusals_are_the_http_paths(worker: grpc_api.Worker, edit, error, message) -> None:
    message_ = request(X, raw=False)
    edit(message_)
    with pytest.raises(error, match=message):
        grpc_api.model_infer(message_, worker)


def test_bytes_must_be_utf8() -> None:
    tensor = pb.ModelInferRequest().inputs.add(name="island", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"\xff")
    with pytest.raises(errors.BadRequestError, match="UTF-8"):
        grpc_api.typed_values(tensor, raw_columns=True)


def test_kserve_layout_names_the_model_in_field_one(worker: grpc_api.Worker) -> None:
    """KServe's RepositoryModelLoadRequest has model_name as field 1 (Triton's repository_name):
    its name reaches the same model-control rules."""
    kserve = pb.message("RepositoryModelLoadRequest")(repository_name="clf")
    with pytest.raises(errors.ForbiddenError, match="model control is 'none'"):
        grpc_api.repository_model_load(kserve, worker)
    with pytest.raises(errors.BadRequestError, match="model_name is empty"):
        grpc_api.repository_model_unload(pb.message("RepositoryModelUnloadRequest")(), worker)


# --- one worker's gRPC server in this process ------------------------------------------------


@pytest.fixture
def grpc_channel(worker: grpc_api.Worker) -> object:
    """A channel to one worker's gRPC server, with a token."""
    config = ServiceConfig(model=worker.config.model, grpc_port=free_port(), max_batch=4)
    auth = BearerAuth((b"token-123456",), frozenset())
    server = GrpcServer(Gateway(config, worker.registry, auth=auth), config)
    channel = grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}")
    yield channel
    channel.close()
    server.stop(0).wait()


@pytest.fixture
def grpc_server(grpc_channel) -> object:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc_channel)


def call(method, message, token: str | None = "token-123456") -> tuple[str, object]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        return "OK", method(message, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def test_a_version_that_is_not_loaded(grpc_server, worker: grpc_api.Worker) -> None:
    assert call(grpc_server.ServerReady, service_pb2.ServerReadyRequest(), None)[1].ready is False
    ready = call(grpc_server.ModelReady, service_pb2.ModelReadyRequest(name="clf", version="2"))
    assert ready[1].ready is False
    infer = service_pb2.ModelInferRequest(model_name="clf", model_version="2")
    code, details = call(grpc_server.ModelInfer, infer)
    assert code == "UNAVAILABLE" and "version 2 is not ready" in details
    code, details = call(grpc_server.ModelMetadata, service_pb2.ModelMetadataRequest(name="clf"))
    assert code == "UNAVAILABLE"  # the default version is the highest: 2
    code, details = call(grpc_server.ModelConfig, service_pb2.ModelConfigRequest(name="clf"))
    assert code == "UNAVAILABLE" and "version 2 is not ready" in details


def test_health_check_follows_readiness(grpc_channel) -> None:
    """grpc.health.v1 Check needs no token and says NOT_SERVING while ServerReady says false
    (here: clf/2 is not loaded); an unknown service is NOT_FOUND. Watch is not served."""
    request = pb.message("HealthCheckRequest", pb.HEALTH_FILE)
    check = grpc_channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=request.SerializeToString,
        response_deserializer=pb.HealthCheckResponse.FromString,
    )
    for service in ("", "inference.GRPCInferenceService"):
        code, response = call(check, request(service=service), None)
        assert code == "OK" and response.status == pb.HealthCheckResponse.NOT_SERVING
    code, details = call(check, request(service="nope.Service"), None)
    assert code == "NOT_FOUND" and "unknown service 'nope.Service'" in details
    watch = grpc_channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.RpcError) as caught:
        next(watch(b""))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_draining_and_auth(grpc_server, worker: grpc_api.Worker) -> None:
    live = call(grpc_server.ServerLive, service_pb2.ServerLiveRequest(), None)
    assert live[0] == "OK" and live[1].live
    code, details = call(grpc_server.ServerMetadata, service_pb2.ServerMetadataRequest(), None)
    assert code == "UNAUTHENTICATED" and "bearer token" in details
    assert call(grpc_server.ServerMetadata, service_pb2.ServerMetadataRequest(), "bad")[0] == (
        "UNAUTHENTICATED"
    )
    worker.registry.draining = True
    try:
        ready = call(grpc_server.ServerReady, service_pb2.ServerReadyRequest(), None)
        assert ready[1].ready is False
    finally:
        worker.registry.draining = False


def test_a_bug_is_internal_and_the_server_keeps_serving(grpc_server, monkeypatch) -> None:
    def broken() -> None:
        raise ZeroDivisionError

    monkeypatch.setattr(v2, "server_metadata", broken)
    code, details = call(grpc_server.ServerMetadata, service_pb2.ServerMetadataRequest())
    assert code == "INTERNAL" and details == "internal error: ZeroDivisionError"
    assert call(grpc_server.ServerLive, service_pb2.ServerLiveRequest())[0] == "OK"


def test_a_grpc_process_that_cannot_start_halts_the_server(tmp_path: Path) -> None:
    """The master's side (service/gunicorn_conf.py): a gRPC process that exits with the boot
    error (here: no runtime directory) halts the server, as a worker that cannot boot does."""
    config = ServiceConfig(runtime_dir=str(tmp_path / "missing"), grpc_port=free_port())
    processes = GrpcProcesses(config)
    processes.start()
    deadline = time.monotonic() + 60
    with pytest.raises(HaltServer, match="the gRPC server failed to start"):
        while time.monotonic() < deadline:
            processes.reap()
            time.sleep(0.1)
    assert not processes.procs


def test_readiness_waits_for_a_grpc_process(tmp_path: Path) -> None:
    """With --grpc-port, readiness says no until a gRPC process announces that it serves (a
    client waiting for readiness finds both protocols answering); once is enough."""
    model = build_mlp_classifier(tmp_path / "m.onnx")
    config = ServiceConfig(model=str(model), grpc_port=free_port(), runtime_dir=str(tmp_path))
    store = ModelStore(tmp_path)
    store.init(find_models(str(model), None), config)
    registry = ModelRegistry({})
    registry.apply_state(store.read(), "cpu", 1, "auto")
    assert registry.ready and not registry.ready_to_serve
    store.set_grpc_serving()
    registry.apply_state(store.read(), "cpu", 1, "auto")
    assert registry.ready_to_serve
    store.set_grpc_serving()  # a restarted gRPC process changes nothing
    assert store.read()["generation"] == 1


def test_grpc_port_option_and_its_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BNSERVE_GRPC_PORT", "BNSERVE_GRPC_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    assert config_from_args(["m.onnx"]).grpc_port == 8001
    assert config_from_args(["m.onnx", "--grpc-workers", "2"]).grpc_workers == 2
    monkeypatch.setenv("BNSERVE_GRPC_PORT", "0")
    assert config_from_args(["m.onnx"]).grpc_port == 0
    check_grpc_port(ServiceConfig(grpc_port=0))  # off: nothing to check
    with pytest.raises(UsageError, match="is also the HTTP --port"):
        check_grpc_port(ServiceConfig(port=9000, grpc_port=9000))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(UsageError, match=f"--grpc-port {taken}: cannot listen on"):
            check_grpc_port(ServiceConfig(host="127.0.0.1", grpc_port=taken))
