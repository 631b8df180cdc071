"""The gRPC messages and services, from service/grpc_predict_v2.proto (the Open Inference
Protocol) and service/grpc_health_v1.proto (the standard health protocol).

Each proto file is compiled into a descriptor set (the same name with .binpb, written by
scripts/grpc_codegen.sh with grpcio-tools) and loaded here into a descriptor pool of our own
rather than protobuf's default pool: the protocol's package is `inference`, and a process that
also imports another copy of it (`tritonclient.grpc`, KServe) would otherwise fail with
"duplicate symbol" on whichever is imported second (the same holds for grpc.health.v1 and
grpcio-health-checking). Loading a descriptor also needs no generated Python code, so the
messages work with any protobuf runtime of the floor in pyproject.toml and later; `protoc` runs
only when a proto file changes (tests/service/test_grpc_codec.py compares each with its set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_FILE = "grpc_predict_v2.proto"
HEALTH_PROTO_FILE = "grpc_health_v1.proto"
PROTO_FILES = (PROTO_FILE, HEALTH_PROTO_FILE)


def descriptor_set(proto_file: str) -> Path:
    """The compiled descriptor set of `proto_file`, next to it."""
    return Path(__file__).with_name(proto_file).with_suffix(".binpb")


_POOL = descriptor_pool.DescriptorPool()
for _proto in PROTO_FILES:
    _set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set(_proto).read_bytes())
    for _file in _set.file:
        _POOL.Add(_file)
FILE = _POOL.FindFileByName(PROTO_FILE)
SERVICE = FILE.services_by_name["GRPCInferenceService"]  # full name: inference.GRPCInferenceService
HEALTH_FILE = _POOL.FindFileByName(HEALTH_PROTO_FILE)
HEALTH = HEALTH_FILE.services_by_name["Health"]  # full name: grpc.health.v1.Health


def message(name: str, file: Any = FILE) -> Any:
    """The message class of `name` (e.g. "ModelInferRequest") in `file` (the inference
    protocol's unless told)."""
    return message_factory.GetMessageClass(file.message_types_by_name[name])


ServerLiveResponse = message("ServerLiveResponse")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
ModelConfig = message("ModelConfig")
ModelConfigResponse = message("ModelConfigResponse")
RepositoryIndexResponse = message("RepositoryIndexResponse")
RepositoryModelLoadResponse = message("RepositoryModelLoadResponse")
RepositoryModelUnloadResponse = message("RepositoryModelUnloadResponse")
HealthCheckResponse = message("HealthCheckResponse", HEALTH_FILE)
