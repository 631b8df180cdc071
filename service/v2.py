"""The Open Inference Protocol (KServe V2 / Triton HTTP/REST) routes.

Health answers by status code, metadata describes models in the protocol's shape (with labels,
device and the converter's reports under `parameters`), and `infer` speaks JSON tensors, the
binary tensor data extension and the classification extension, so `tritonclient.http` works with
its defaults. The gRPC methods of the same protocol (service/grpc_api.py) call the functions
here for everything but the transport: `infer_tensors`, `model_metadata`, `triton_config`,
`repository_index_document`, `change_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

import bnserve
from bnserve.service.body import JsonBudget, dumps, json_type, parse_json_object, read_body
from bnserve.service.columns import RawColumn, decode_column
from bnserve.service.config import ServiceConfig
from bnserve.service.drift import window_for
from bnserve.service.errors import BadRequestError, ForbiddenError, GatewayTimeoutError
from bnserve.service.registry import ModelRegistry, ModelVersions
from bnserve.service.reload import ModelStore, ReloadError
from bnserve.service.repository import find_models
from bnserve.service.routes import Answer, Call, json_answer
from bnserve.service.runtime import ModelRuntime
from bnserve.service.v2_tensors import (
    check_parameters,
    classify,
    datatype_of,
    decode_input,
    encode_output,
)

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
HEADER_LENGTH = "Inference-Header-Content-Length"

EXAMPLE = '{"inputs": [{"name": "input", "shape": [1, F], "datatype": "FP32", "data": [...]}]}'


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def server_metadata() -> dict[str, Any]:
    return {"name": "bnserve", "version": bnserve.__version__, "extensions": EXTENSIONS}


def model_metadata(
    model: ModelVersions, runtime: ModelRuntime, sha256: str | None = None
) -> dict[str, Any]:
    """The protocol's model metadata, plus what a client of a classifier wants to know."""
    info = runtime.info
    batch = info.fixed_batch  # any batch is served (service/runtime.py runs it in chunks)
    outputs = [
        {
            "name": o.name,
            "datatype": datatype_of(o.dtype),
            "shape": [
                -1 if d is None or (i == 0 and d == batch) else d for i, d in enumerate(o.shape)
            ],
        }
        for o in info.outputs
    ]
    parameters: dict[str, Any] = {
        "labels": list(runtime.labels),
        "feature_names": list(info.feature_names) if info.feature_names else None,
        "device": runtime.device,
        "score_output": info.score_output,
        "output_kind": info.output_kind,
        "default_version": str(model.default),
        "sha256": sha256,  # the served file's content hash: it changes with every reload
        **info.reports(),
    }
    if info.columns is not None:
        inputs = [{"name": c.name, "datatype": c.datatype, "shape": [-1, 1]} for c in info.columns]
        parameters["columns"] = [c.describe() for c in info.columns]
    else:
        inputs = [
            {
                "name": info.input.name,
                "datatype": datatype_of(info.input.dtype),
                "shape": [-1, info.n_features],
            }
        ]
    return {
        "name": model.name,
        "versions": model.version_names(),
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": parameters,
    }


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tail) using the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequestError(
            f"{HEADER_LENGTH} must be an integer, got {header_length!r}"
        ) from None
    if not 0 < length <= len(body):
        raise BadRequestError(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def infer(
    runtime: ModelRuntime, body: bytes, header_length: str | None, config: ServiceConfig
) -> tuple[bytes, dict[str, str]]:
    """Run one infer request; returns the response body and its extra headers."""
    max_batch = config.max_batch
    header_bytes, binary = split_body(body, header_length)
    budget = JsonBudget.for_rows(max_batch, runtime.info.n_features)
    header = parse_json_object(header_bytes, EXAMPLE, budget)
    result = infer_tensors(runtime, header, binary, config)
    request_id = result.request_id
    entries, tails = [], []
    for name, array, binary_out in result.outputs:
        entry, raw = encode_output(name, array, binary_out)
        entries.append(entry)
        if raw:
            tails.append(raw)
    response: dict[str, Any] = {"model_name": runtime.name, "model_version": str(runtime.version)}
    if request_id is not None:
        response["id"] = request_id
    if result.warnings:  # inputs outside the training profile (service/profile.py)
        response["parameters"] = {"out_of_range": result.warnings}
    response["outputs"] = entries
    json_part = dumps(response)
    if not any("parameters" in e for e in entries):
        return json_part, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(json_part))}
    return json_part + b"".join(tails), headers


@dataclass
class InferResult:
    """One request's id, one (name, array, binary) per requested output (classification
    applied), and the inputs outside the training profile (service/profile.py)."""

    request_id: str | None
    outputs: list[tuple[str, np.ndarray, bool]]
    warnings: list[dict[str, Any]]


def infer_tensors(
    runtime: ModelRuntime, header: dict[str, Any], binary: memoryview, config: ServiceConfig
) -> InferResult:
    """Decode, check and run one request of the protocol's shape (the JSON header over HTTP; the
    gRPC server builds the same from its message). `binary` holds the inputs sent as raw bytes,
    in the order of the inputs, each declared by its `binary_data_size` parameter. The inputs
    are checked against the training profile and counted into the drift window."""
    max_batch = config.max_batch
    inputs = header.get("inputs")
    info = runtime.info
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError(f"'id' must be a string, got a JSON {json_type(request_id)}")
    if info.columns is not None:
        x: Any = decode_columns(inputs, binary, info.columns, max_batch)
    elif not isinstance(inputs, list) or len(inputs) != 1:
        got = len(inputs) if isinstance(inputs, list) else "no array of"
        raise BadRequestError(
            f"expected 'inputs' with exactly one tensor named {runtime.info.input.name!r}, got {got} inputs"
        )
    else:
        x = decode_input(
            inputs[0], binary, info.input.name, info.n_features, info.input.dtype, max_batch
        )
    warnings = runtime.check_inputs(x, config.on_out_of_range, config.out_of_range_k)
    drift = window_for(runtime, config)
    if drift is not None:
        drift.observe(x)
    requested = _requested_outputs(header, runtime)
    names = list(dict.fromkeys(name for name, _, _ in requested))
    results = dict(zip(names, runtime.run(names, x), strict=True))
    outputs = []
    for name, binary_out, k in requested:
        array = results[name]
        if k is not None:
            if array.ndim != 2 or k > array.shape[1]:
                raise BadRequestError(
                    f"output {name!r} has shape {list(array.shape)}: classification {k} needs "
                    f"a [batch, classes] output with at least {k} class(es)"
                )
            labels = info.labels if info.labels and len(info.labels) == array.shape[1] else None
            array = classify(array, k, labels)
        outputs.append((name, array, binary_out))
    return InferResult(request_id, outputs, warnings)


def decode_columns(
    inputs: Any, binary: memoryview, columns: tuple[RawColumn, ...], max_batch: int
) -> dict[str, np.ndarray]:
    """The named input tensors of a raw-column model, one per column, all of one batch size;
    binary parts are taken in the order of the inputs, as the protocol lays them out."""
    names = [c.name for c in columns]
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise BadRequestError(f"'inputs' must be an array of tensors, one per column {names}")
    given = [t.get("name") for t in inputs]
    absent = [n for n in names if n not in given]
    unknown = [n for n in given if n not in names]
    if absent or unknown or len(given) != len(set(given)):
        raise BadRequestError(
            f"expected one input per column {names} (BYTES for categorical, FP32 otherwise); "
            f"missing {absent}, unknown {unknown}"
        )
    by_name = {c.name: c for c in columns}
    feeds, offset = {}, 0
    for tensor in inputs:
        column = by_name[tensor["name"]]
        feeds[column.name] = decode_column(tensor, binary[offset:], column, max_batch)
        parameters = tensor.get("parameters")
        if isinstance(parameters, dict) and type(parameters.get("binary_data_size")) is int:
            offset += parameters["binary_data_size"]
    if offset != len(binary):
        raise BadRequestError(
            f"the body has {len(binary)} bytes of binary data, the inputs declare {offset}"
        )
    rows = {len(a) for a in feeds.values()}
    if len(rows) != 1:
        raise BadRequestError(f"every input must have the same batch size, got {sorted(rows)}")
    return feeds


def _requested_outputs(
    header: dict[str, Any], runtime: ModelRuntime
) -> list[tuple[str, bool, int | None]]:
    """(name, binary, classification k) per output to return; all outputs when none are named."""
    parameters = check_parameters(header.get("parameters"), "'parameters'")
    default_binary = parameters.get("binary_data_output", False)
    if type(default_binary) is not bool:
        raise BadRequestError("parameter 'binary_data_output' must be true or false")
    available = [o.name for o in runtime.info.outputs]
    outputs = header.get("outputs")
    if outputs is None or outputs == []:  # an empty list asks for nothing in particular: all
        return [(name, default_binary, None) for name in available]
    if not isinstance(outputs, list):
        raise BadRequestError("'outputs' must be an array of {\"name\": ...} objects")
    if len(outputs) > len(available):
        raise BadRequestError(
            f"'outputs' lists {len(outputs)} outputs; the model has {len(available)} "
            f"({', '.join(available)}), each may be requested once"
        )
    requested = []
    seen: set[str] = set()
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in available:
            raise BadRequestError(f"unknown output {name!r}: the model's outputs are {available}")
        if name in seen:
            raise BadRequestError(f"output {name!r} is requested twice; request each output once")
        seen.add(name)
        params = check_parameters(output.get("parameters"), f"output {name!r}: 'parameters'")
        binary = params.get("binary_data", default_binary)
        if type(binary) is not bool:
            raise BadRequestError(f"output {name!r}: 'binary_data' must be true or false")
        k = params.get("classification")
        if k is not None and (type(k) is not int or not 1 <= k <= runtime.n_classes):
            raise BadRequestError(
                f"output {name!r}: classification must be an integer from 1 to {runtime.n_classes}, got {k!r}"
            )
        requested.append((name, binary, k))
    return requested


def server_metadata_route(call: Call) -> Answer:
    return json_answer(dumps(server_metadata()))


def live_route(call: Call) -> Answer:
    return json_answer(dumps({"live": True}))


def ready_route(call: Call) -> Answer:
    registry = call.registry
    ready = registry.ready_to_serve
    return json_answer(dumps({"ready": ready}), 200 if ready else 503)


def model_metadata_route(call: Call) -> Answer:
    name, version = call.params["name"], call.params.get("version")
    registry = call.registry
    runtime = registry.get(name, version)
    sha = registry.hashes.get((name, runtime.version))
    return json_answer(dumps(model_metadata(registry.model(name), runtime, sha)))


#: Open Inference Protocol datatype -> Triton model-configuration data type.
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def triton_config(model: ModelVersions, runtime: ModelRuntime, max_batch: int) -> dict[str, Any]:
    """The model in Triton's model-configuration JSON (what `get_model_config` returns): the
    batch dimension is implicit (`max_batch_size` > 0), so `dims` leave it out. gRPC's
    ModelConfig parses this document into Triton's message: only fields of its ModelConfig
    (service/grpc_predict_v2.proto) may appear here."""
    metadata = model_metadata(model, runtime)

    def tensors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "name": e["name"],
                "data_type": TRITON_TYPES[e["datatype"]],
                "dims": [d for d in e["shape"][1:]] or [1],
            }
            for e in entries
        ]

    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [int(v) for v in model.version_names()]}},
        "max_batch_size": max_batch,
        "input": tensors(metadata["inputs"]),
        "output": tensors(metadata["outputs"]),
        # the metadata's parameters (labels, default version, training profile...), each as
        # the text Triton's string parameters hold: JSON unless it is text already
        "parameters": {
            key: {"string_value": value if isinstance(value, str) else json_text(value)}
            for key, value in metadata["parameters"].items()
            if value is not None
        },
    }


def config_route(call: Call) -> Answer:
    """`GET /v2/models/{m}[/versions/{v}]/config`: the Triton-style model configuration."""
    name = call.params["name"]
    runtime = call.registry.get(name, call.params.get("version"))
    model = call.registry.model(name)
    return json_answer(dumps(triton_config(model, runtime, call.config.max_batch)))


def model_ready_route(call: Call) -> Answer:
    name = call.params["name"]
    runtime = call.registry.get(name, call.params.get("version"))  # 404 unknown, 503 not loaded
    return json_answer(dumps({"name": name, "version": str(runtime.version), "ready": True}))


def infer_route(call: Call) -> Answer:
    runtime = call.registry.get(call.params["name"], call.params.get("version"))
    config = call.config
    body = read_body(call.environ, config.max_body_bytes)
    header_length = call.environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH")
    payload, headers = infer(runtime, body, header_length, config)
    return 200, [("Content-Length", str(len(payload))), *headers.items()], payload


def repository_index_route(call: Call) -> Answer:
    return json_answer(dumps(repository_index_document(call.registry)))


def load_route(call: Call) -> Answer:
    return json_answer(dumps(control_model(call, "load", call.params["name"])))


def unload_route(call: Call) -> Answer:
    return json_answer(dumps(control_model(call, "unload", call.params["name"])))


def repository_index_document(registry: ModelRegistry) -> list[dict[str, Any]]:
    """The repository extension's index: one entry per model version, READY or UNAVAILABLE."""
    entries = []
    for name, model in registry.models.items():
        for version in model.paths:
            entry: dict[str, Any] = {"name": name, "version": str(version)}
            if version in model.loaded:
                entry["state"] = "READY"
            else:
                entry["state"] = "UNAVAILABLE"
                entry["reason"] = model.errors.get(version, "not loaded")
            entries.append(entry)
    for name in sorted(registry.unloaded):
        entries.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})
    return entries


# The load request's own parameter; Triton's `config` and `file:` overrides are not supported,
# and tritonclient's unload sends `unload_dependents` (there are no dependents here).
_CONTROL_PARAMETERS = {"load": {"allow_signature_change"}, "unload": {"unload_dependents"}}


def control_model(call: Call, action: str, name: str) -> dict[str, Any]:
    """`POST /v2/repository/models/{name}/load|unload`: the body's parameters, then
    `change_model`."""
    config = call.config
    refuse_without_model_control(config, action)
    body = read_body(call.environ, config.max_body_bytes)
    document = parse_json_object(body, '{"parameters": {...}}') if body.strip() else {}
    parameters = check_parameters(document.get("parameters"), "'parameters'")
    return change_model(call.registry, call.store, config, action, name, parameters)


def refuse_without_model_control(config: ServiceConfig, action: str) -> None:
    """ForbiddenError unless the server runs with --model-control explicit."""
    if config.model_control != "explicit":
        raise ForbiddenError(
            f"model control is {config.model_control!r}: this server does not {action} models "
            "on request. Start it with --model-control explicit (BNSERVE_MODEL_CONTROL=explicit) "
            "to use this route; SIGHUP to the server reloads the served models"
        )


def change_model(
    registry: ModelRegistry,
    store: ModelStore | None,
    config: ServiceConfig,
    action: str,
    name: str,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """Load or unload model `name` (HTTP route or gRPC method): queue it for the reload runner
    (the gunicorn master starts it), wait for the result, switch this worker at once (the others
    before their next request)."""
    refuse_without_model_control(config, action)
    if store is None:
        raise BadRequestError(f"{action} needs the model store that `bnserve serve` sets up")
    unknown = set(parameters) - _CONTROL_PARAMETERS[action]
    if unknown:
        raise BadRequestError(
            f"unsupported {action} parameter(s) {', '.join(sorted(unknown))} "
            f"(supported: {', '.join(sorted(_CONTROL_PARAMETERS[action]))})"
        )
    allow = parameters.get("allow_signature_change", False)
    if type(allow) is not bool:
        raise BadRequestError("parameter 'allow_signature_change' must be true or false")
    known = name in registry.models or name in registry.unloaded
    if not known and (
        action == "unload" or name not in find_models(config.model, config.model_name)
    ):
        registry.model(name)  # 404 naming the served models
    ticket = store.submit(action, [name], allow or config.allow_signature_change)
    results = store.wait(ticket, timeout=max(1.0, config.timeout * 0.8))
    if results is None:
        raise GatewayTimeoutError(
            f"the {action} of model {name!r} is still running; its result is logged and "
            "reaches every worker when it passes"
        )
    result = results.get(name) or results.get("*") or {"result": "failed", "error": "no result"}
    # this worker switches now; the others before their next request (one stat each)
    registry.apply_state(store.read(), config.device, config.intra_op_threads, config.output_kind)
    if result["result"] == "failed":
        raise ReloadError(
            f"model {name!r} not {action}ed, still serving the last good version: {result['error']}"
        )
    return {"name": name, "result": result["result"], "versions": result.get("versions", {})}
