#!/usr/bin/env bash
# Compile service/grpc_predict_v2.proto into the descriptor set the service loads
# (service/grpc_predict_v2.binpb). Needs grpcio-tools (the test extra installs it; the checked-in
# file was written by grpcio-tools 1.81.1, libprotoc 33.5). tests/service/test_grpc_codec.py
# fails when the two disagree.
set -euo pipefail
cd "$(dirname "$0")/../service"
python -m grpc_tools.protoc -I . --descriptor_set_out=grpc_predict_v2.binpb grpc_predict_v2.proto
echo "wrote service/grpc_predict_v2.binpb"
