"""The Open Inference Protocol's gRPC methods (`inference.GRPCInferenceService`) and the
standard health check (`grpc.health.v1.Health`).

Each method turns its protobuf request into what the HTTP V2 path works on and its answer back
into a protobuf response; the decoding, validation, inference, classification, metadata and
model control are the HTTP path's own functions (service/v2.py, v2_tensors.py, columns.py), so
a request means the same and is refused for the same reasons whichever protocol carries it, and
a refusal raises the same `BnserveError` (service/grpc_server.py maps it to a status code).

An infer request's inputs become the HTTP path's JSON tensors: typed contents become `data`
(BYTES elements UTF-8 text; for a raw-column model NaN in FP32/FP64 contents means missing, as
it does in raw bytes), raw contents become the binary tensor extension's bytes, one
`binary_data_size` per input. The response carries raw outputs (`raw_output_contents`, as Triton
answers and `tritonclient.grpc` reads) when the request sent raw inputs or asked for binary
outputs (`binary_data_output`, an output's `binary_data`); typed contents otherwise. gRPC has no
metadata `parameters`: labels and column descriptions stay on HTTP (`GET /v2/models/{m}`); the
labels are also in ModelConfig's parameters, as in the HTTP config route.

Pure functions of messages and the worker's state: no grpc import, no sockets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format, message_factory

from bnserve.service import api, v2
from bnserve.service import grpc_messages as pb
from bnserve.service.config import ServiceConfig
from bnserve.service.errors import BadRequestError, NotFoundError
from bnserve.service.registry import ModelRegistry
from bnserve.service.routes import Route, is_open
from bnserve.service.runtime import ModelRuntime
from bnserve.service.v2_tensors import datatype_of, encode_output

# The field of InferTensorContents that holds each datatype's elements (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass
class Worker:
    """What a method works on: this worker's models, settings and model store."""

    registry: ModelRegistry
    config: ServiceConfig
    store: Any = None  # service.reload.ModelStore, under `bnserve serve`


def parameter_value(parameter: Any) -> Any:
    """The Python value of an InferParameter or ModelRepositoryParameter (None when unset)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def parameters_of(parameters: Mapping[str, Any]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


# -- health and metadata ----------------------------------------------------------------------


def server_live(request: Any, worker: Worker) -> Any:
    return pb.ServerLiveResponse(live=True)


def server_ready(request: Any, worker: Worker) -> Any:
    return pb.ServerReadyResponse(ready=worker.registry.ready_to_serve)


def model_ready(request: Any, worker: Worker) -> Any:
    """NOT_FOUND for an unknown (or unloaded) model or version, like HTTP's 404; a known version
    that is not loaded answers `ready: false` (HTTP answers 503)."""
    registry = worker.registry
    model = registry.model(request.name)
    version = registry.version_of(model, request.version or None)
    return pb.ModelReadyResponse(ready=version in model.loaded)


def health_check(request: Any, worker: Worker) -> Any:
    """grpc.health.v1 Check: SERVING when ServerReady would say ready, NOT_SERVING otherwise
    (starting, draining). The server ("") and the inference service share that one status;
    any other name is NOT_FOUND, as the health protocol asks."""
    if request.service not in ("", pb.SERVICE.full_name):
        raise NotFoundError(
            f"unknown service {request.service!r}: ask about '' (the server) or "
            f"{pb.SERVICE.full_name!r}"
        )
    serving = worker.registry.ready_to_serve
    return pb.HealthCheckResponse(status="SERVING" if serving else "NOT_SERVING")


def server_metadata(request: Any, worker: Worker) -> Any:
    return pb.ServerMetadataResponse(**v2.server_metadata())


def model_metadata(request: Any, worker: Worker) -> Any:
    registry = worker.registry
    runtime = registry.get(request.name, request.version or None)
    sha = registry.hashes.get((request.name, runtime.version))
    document = v2.model_metadata(registry.model(request.name), runtime, sha)
    response = pb.ModelMetadataResponse(
        name=document["name"], versions=document["versions"], platform=document["platform"]
    )
    for kind in ("inputs", "outputs"):
        for tensor in document[kind]:
            shape = [d if isinstance(d, int) else -1 for d in tensor["shape"]]
            getattr(response, kind).add(
                name=tensor["name"], datatype=tensor["datatype"], shape=shape
            )
    return response


def model_config(request: Any, worker: Worker) -> Any:
    """The HTTP route's Triton configuration (v2.triton_config) as a message: one document for
    both protocols, so a field added there either reaches gRPC or fails here (ParseError:
    INTERNAL, and tests/service/test_grpc_codec.py), never drifts silently."""
    registry = worker.registry
    runtime = registry.get(request.name, request.version or None)
    document = v2.triton_config(registry.model(request.name), runtime, worker.config.max_batch)
    return pb.ModelConfigResponse(config=json_format.ParseDict(document, pb.ModelConfig()))


# -- inference --------------------------------------------------------------------------------


def model_infer(request: Any, worker: Worker) -> Any:
    runtime = worker.registry.get(request.model_name, request.model_version or None)
    header, binary, raw = infer_header(request, runtime.info.columns is not None)
    result = v2.infer_tensors(runtime, header, binary, worker.config)
    return infer_response(runtime, result.request_id, result.outputs, raw)


def infer_header(request: Any, raw_columns: bool) -> tuple[dict[str, Any], memoryview, bool]:
    """(the HTTP path's JSON header for `request`, its raw inputs end to end, whether the inputs
    were raw). `raw_columns`: the model reads raw table columns (NaN in typed floats = missing)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send "
            "one per input, in the order of the inputs (or typed contents for every input)"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        parameters = parameters_of(tensor.parameters)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequestError(
                    f"input {tensor.name!r} has typed contents but the request carries "
                    "raw_input_contents: use one or the other for every input"
                )
            parameters["binary_data_size"] = len(raw[i])
        else:
            entry["data"] = typed_values(tensor, raw_columns)
        if parameters:
            entry["parameters"] = parameters
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    if request.parameters:
        header["parameters"] = parameters_of(request.parameters)
    if request.outputs:
        header["outputs"] = [
            {"name": output.name, "parameters": parameters_of(output.parameters)}
            for output in request.outputs
        ]
    return header, memoryview(b"".join(raw)), bool(raw)


def typed_values(tensor: Any, raw_columns: bool) -> list[Any] | None:
    """The elements of an input's typed contents, from the field of its datatype, as the JSON
    `data` of the HTTP path (None for a datatype the decoder will refuse by name)."""
    where = f"input {tensor.name!r}"
    datatype = tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        if datatype in ("FP16", "BF16"):
            raise BadRequestError(f"{where}: {datatype} has no typed contents: send raw contents")
        return None
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise BadRequestError(
            f"{where}: datatype {datatype} takes its values in contents.{field}, "
            f"not {', '.join(others)}"
        )
    values = list(getattr(tensor.contents, field))
    shape = list(tensor.shape)
    if shape and all(d >= 0 for d in shape) and len(values) != math.prod(shape):
        raise BadRequestError(
            f"{where}: shape {shape} holds {math.prod(shape)} values, "
            f"contents.{field} has {len(values)}"
        )
    if datatype == "BYTES":
        try:
            return [value.decode("utf-8") for value in values]
        except UnicodeDecodeError:
            raise BadRequestError(f"{where}: BYTES elements must be UTF-8 text") from None
    if raw_columns and datatype in ("FP32", "FP64"):
        return [None if value != value else value for value in values]  # NaN: missing
    return values


def infer_response(
    runtime: ModelRuntime,
    request_id: str | None,
    results: list[tuple[str, np.ndarray, bool]],
    raw_inputs: bool,
) -> Any:
    """The ModelInferResponse of `results` (v2.infer_tensors): raw contents when the inputs were
    raw or binary outputs were asked for (or a datatype has no typed field), typed otherwise."""
    response = pb.ModelInferResponse(
        model_name=runtime.name, model_version=str(runtime.version), id=request_id or ""
    )
    datatypes = ["BYTES" if a.dtype == object else datatype_of(a.dtype) for _, a, _ in results]
    raw = (
        raw_inputs
        or any(binary for _, _, binary in results)
        or any(d not in CONTENTS_FIELD for d in datatypes)
    )
    for (name, array, _), datatype in zip(results, datatypes, strict=True):
        output = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(encode_output(name, array, binary=True)[1])
        elif datatype == "BYTES":
            output.contents.bytes_contents.extend(str(s).encode() for s in array.ravel())
        else:
            getattr(output.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
    return response


# -- model repository extension ---------------------------------------------------------------


def repository_index(request: Any, worker: Worker) -> Any:
    response = pb.RepositoryIndexResponse()
    for entry in v2.repository_index_document(worker.registry):
        if request.ready and entry["state"] != "READY":
            continue
        response.models.add(
            name=entry["name"],
            version=entry.get("version", ""),
            state=entry["state"],
            reason=entry.get("reason", ""),
        )
    return response


def repository_model_load(request: Any, worker: Worker) -> Any:
    name = _control(request, worker, "load")
    return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True)


def repository_model_unload(request: Any, worker: Worker) -> Any:
    name = _control(request, worker, "unload")
    return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)


def _control(request: Any, worker: Worker, action: str) -> str:
    """Load or unload the request's model under the HTTP routes' rules; its name. Triton's
    layout names it in `model_name`; KServe's puts it in field 1, read here as
    `repository_name` (bnserve serves one repository, so that field names nothing else)."""
    name = request.model_name or request.repository_name
    if not name:
        raise BadRequestError(f"model_name is empty: name the model to {action}")
    parameters = parameters_of(request.parameters)
    v2.change_model(worker.registry, worker.store, worker.config, action, name, parameters)
    return name


# -- the method table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One gRPC method of `service`: its handler, and the HTTP route that answers the same
    question (its access rule applies: health is open, everything else needs the token when
    auth is on)."""

    name: str
    handler: Callable[[Any, Worker], Any]
    route: str
    service: Any = pb.SERVICE  # a ServiceDescriptor of service/grpc_messages.py

    def is_open(self, public_metrics: bool) -> bool:
        return is_open(_ROUTES[self.route], public_metrics)

    @property
    def path(self) -> str:
        """The method's full name as grpc writes it: /package.Service/Method."""
        return f"/{self.service.full_name}/{self.name}"

    @property
    def request_class(self) -> Any:
        return message_factory.GetMessageClass(self._descriptor.input_type)

    @property
    def response_class(self) -> Any:
        return message_factory.GetMessageClass(self._descriptor.output_type)

    @property
    def _descriptor(self) -> Any:
        return self.service.methods_by_name[self.name]


_ROUTES: dict[str, Route] = {route.rule: route for route in api.ROUTES}

METHODS: tuple[Method, ...] = (
    Method("ServerLive", server_live, "/v2/health/live"),
    Method("ServerReady", server_ready, "/v2/health/ready"),
    Method("ModelReady", model_ready, "/v2/models/<name>/ready"),
    Method("ServerMetadata", server_metadata, "/v2"),
    Method("ModelMetadata", model_metadata, "/v2/models/<name>"),
    Method("ModelInfer", model_infer, "/v2/models/<name>/infer"),
    Method("ModelConfig", model_config, "/v2/models/<name>/config"),
    Method("RepositoryIndex", repository_index, "/v2/repository/index"),
    Method("RepositoryModelLoad", repository_model_load, "/v2/repository/models/<name>/load"),
    Method("RepositoryModelUnload", repository_model_unload, "/v2/repository/models/<name>/unload"),
    Method("Check", health_check, "/v2/health/ready", pb.HEALTH),
)

# The services the gRPC server registers: every method of each, and no other, is in METHODS.
SERVICES: tuple[Any, ...] = (pb.SERVICE, pb.HEALTH)

if any(m.route not in _ROUTES for m in METHODS):
    raise ValueError("every gRPC method must name the HTTP route that answers the same question")
for _service in SERVICES:
    _declared = {m.name for m in _service.methods}
    if {m.name for m in METHODS if m.service is _service} != _declared:
        raise ValueError(
            f"the table must serve exactly {sorted(_declared)} of {_service.full_name}"
        )
