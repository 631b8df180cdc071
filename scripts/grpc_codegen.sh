#!/usr/bin/env bash
# Compile each gRPC proto file of service/ (the Open Inference Protocol, grpc_predict_v2.proto,
# and the health protocol, grpc_health_v1.proto) into the descriptor set the service loads, the
# same name with .binpb. Needs grpcio-tools (the test extra installs it; the checked-in files
# were written by grpcio-tools 1.81.1, libprotoc 33.5). tests/service/test_grpc_codec.py fails
# when a proto file and its descriptor set disagree.
set -euo pipefail
cd "$(dirname "$0")/../service"
for proto in grpc_predict_v2.proto grpc_health_v1.proto; do
    python -m grpc_tools.protoc -I . --descriptor_set_out="${proto%.proto}.binpb" "$proto"
    echo "wrote service/${proto%.proto}.binpb"
done
