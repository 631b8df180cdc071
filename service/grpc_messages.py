"""The Open Inference Protocol's gRPC messages and service, from service/grpc_predict_v2.proto.

The proto file is compiled into a descriptor set (service/grpc_predict_v2.binpb, written by
scripts/grpc_codegen.sh with grpcio-tools) and loaded here into a descriptor pool of our own
rather than protobuf's default pool: the protocol's package is `inference`, and a process that
also imports another copy of it (`tritonclient.grpc`, KServe) would otherwise fail with
"duplicate symbol" on whichever is imported second. Loading a descriptor also needs no generated
Python code, so the messages work with any protobuf runtime of the floor in pyproject.toml and
later; `protoc` runs only when the proto file changes (tests/service/test_grpc_codec.py compares
the two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_FILE = "grpc_predict_v2.proto"
DESCRIPTOR_SET = Path(__file__).with_name("grpc_predict_v2.binpb")

_POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file:
    _POOL.Add(_file)
FILE = _POOL.FindFileByName(PROTO_FILE)
SERVICE = FILE.services_by_name["GRPCInferenceService"]  # full name: inference.GRPCInferenceService


def message(name: str) -> Any:
    """The message class of `name` (e.g. "ModelInferRequest")."""
    return message_factory.GetMessageClass(FILE.message_types_by_name[name])


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
