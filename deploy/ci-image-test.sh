#!/usr/bin/env bash
# Build the bnserve image and talk to the running container: what CI runs on every submission
# (through tests/deploy/test_container.py), and what a developer runs by hand:
#
#   sudo bash deploy/ci-image-test.sh
#
# On a machine with package registries but no image registry and no Docker engine:
#  1. installs docker.io and mmdebstrap with apt-get when missing;
#  2. starts a private dockerd (roots, pidfile and socket under a temporary directory; no iptables,
#     no bridge, no IP forwarding: builds and containers use --network host);
#  3. builds python:3.11-slim locally (mmdebstrap + docker import, tarball cached in
#     ~/.cache/bnserve) so that the Dockerfile is the one a user builds against a real registry;
#  4. builds the image (BuildKit via Debian's /usr/bin/docker, and/or the legacy builder);
#  5. checks the image: no trainer libraries, compilers or pip cache in it;
#  6. runs it read-only as its non-root user on the host's loopback, waits for health, sends
#     /predict and a V2 infer and checks the answers, asks for readiness, metadata and an
#     inference over gRPC, checks the user, the health check and that SIGTERM reaches the
#     gunicorn master;
#  7. `docker stop`s it under load and checks that it drains and exits 0 within the grace period;
#  8. stops dockerd by its PID and removes everything it left (trap: on failure too).
#
# Environment:
#   BN_BUILDER=buildkit|legacy|both   which builder(s) to build with (default: buildkit; `both`
#                                     also builds with the legacy builder, about 2 minutes more)
#   BN_LOG_DIR=DIR                    where the build and container logs are kept
#                                     (default: /tmp/bnserve-ci-logs)
#   BN_KEEP_IMAGE=FILE                also `docker save` the built image to FILE
#   BN_REQUIRE_DRAIN=0                only warn when readiness never answers 503 during the drain
#                                     (default: fail; the container runs with BNSERVE_DRAIN_SECONDS=2)
#   BN_REBUILD_BASE=1                 rebuild the cached base tarball
#   BN_CACHE_DIR=DIR                  where the base tarball is cached (~/.cache/bnserve)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=deploy/local-docker.sh
source "$here/local-docker.sh"

PY=${PYTHON:-python3}
IMAGE=bnserve:ci-test
BUILDER=${BN_BUILDER:-buildkit}
LOG_DIR=${BN_LOG_DIR:-/tmp/bnserve-ci-logs}
GRACE=20          # docker stop -t: seconds before SIGKILL
DRAIN=2           # BNSERVE_DRAIN_SECONDS in the container under test
MODEL_NAME=digits
CID=
T0=$(date +%s)

phase() { bn_log "== $* (+$(($(date +%s) - T0)) s)"; }

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$CID" ]]; then
        docker logs "$CID" >"$LOG_DIR/container.log" 2>&1
        if [[ $rc -ne 0 ]]; then
            bn_log "container log (last 60 lines):"
            tail -n 60 "$LOG_DIR/container.log" >&2
        fi
    fi
    [[ -n "${BN_WORK:-}" ]] && cp "$BN_WORK"/*.log "$LOG_DIR/" 2>/dev/null
    [[ -n "$CID" ]] && docker rm -f "$CID" >/dev/null 2>&1
    bn_stop_dockerd
    if [[ $rc -eq 0 ]]; then
        bn_log "PASSED in $(($(date +%s) - T0)) s"
    else
        bn_log "FAILED (exit $rc) after $(($(date +%s) - T0)) s"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $(id -u) -ne 0 ]]; then
    bn_log "run as root: it starts its own dockerd"
    exit 3
fi

mkdir -p "$LOG_DIR" && rm -f "$LOG_DIR"/*.log
# Exit status 3: the engine could not be set up here (no apt, no dockerd, no Debian mirror), as
# opposed to 1: the image or the service failed a check. The pytest wrapper skips on 3 unless CI.
phase "tools"
bn_install_tools || { bn_log "cannot install docker.io and mmdebstrap"; exit 3; }
bn_start_dockerd || { bn_log "cannot start dockerd"; exit 3; }
phase "base image"
bn_load_base_image || { bn_log "cannot build the base image"; exit 3; }

build() {  # build ONE_BUILDER: the same Dockerfile, the same tag
    local how=$1 t
    t=$(date +%s)
    case $how in
    buildkit)
        [[ -x /usr/bin/docker ]] || { bn_log "no /usr/bin/docker (Debian's docker.io)"; return 1; }
        DOCKER_BUILDKIT=1 /usr/bin/docker build --network host --progress plain \
            -t "$IMAGE" -f "$root/Dockerfile" "$root" >"$BN_WORK/build-$how.log" 2>&1 ;;
    legacy)
        DOCKER_BUILDKIT=0 docker build --network host \
            -t "$IMAGE" -f "$root/Dockerfile" "$root" >"$BN_WORK/build-$how.log" 2>&1 ;;
    esac || {
        bn_log "docker build ($how) failed; last 40 lines:"
        tail -n 40 "$BN_WORK/build-$how.log" >&2
        return 1
    }
    bn_log "built $IMAGE with the $how builder in $(($(date +%s) - t)) s"
}

case $BUILDER in
both)
    phase "build (legacy builder, $(docker version -f '{{.Client.Version}}' 2>/dev/null) client)"
    build legacy
    docker rmi "$IMAGE" >/dev/null
    phase "build (BuildKit, /usr/bin/docker $(/usr/bin/docker version -f '{{.Client.Version}}' 2>/dev/null))"
    build buildkit ;;
buildkit | legacy)
    phase "build ($BUILDER)"
    build "$BUILDER" ;;
*)
    bn_log "BN_BUILDER must be buildkit, legacy or both"
    exit 2 ;;
esac
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
bn_log "image size $((size / 1024 / 1024)) MiB (base $(($(docker image inspect -f '{{.Size}}' "$BN_BASE_TAG") / 1024 / 1024)) MiB)"
[[ -n "${BN_KEEP_IMAGE:-}" ]] && docker save -o "$BN_KEEP_IMAGE" "$IMAGE"

phase "image contents"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[[ $user == 10001* ]] || { bn_log "image USER is '$user', expected 10001"; exit 1; }
docker run --rm --network none --read-only --entrypoint python "$IMAGE" -c '
import importlib.util, os, shutil, sys
bad = [m for m in ("torch", "sklearn", "matplotlib", "scipy", "tqdm") if importlib.util.find_spec(m)]
assert not bad, f"trainer libraries in the runtime image: {bad}"
cc = [c for c in ("gcc", "cc", "g++", "make", "curl") if shutil.which(c)]
assert not cc, f"build tools in the runtime image: {cc}"
assert not os.path.exists("/root/.cache/pip"), "pip cache left in the image"
assert importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("bnserve.service")
assert not importlib.util.find_spec("service"), "a top-level service package in the image"
assert os.path.isfile("/models/digits/1/model.onnx"), "no default model in /models"
print("runtime image: serving install only; default model present; uid", os.getuid())
'

phase "run read-only"
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
GRPC_PORT=$(free_port)
URL="http://127.0.0.1:$PORT"
# --network host: the container shares the host's network, so it must listen on loopback only.
CID=$(docker run -d --network host --read-only --tmpfs /tmp:rw,nosuid,nodev,size=64m \
    --health-interval 2s --health-start-period 60s \
    -e BNSERVE_HOST=127.0.0.1 -e BNSERVE_PORT="$PORT" -e BNSERVE_GRPC_PORT="$GRPC_PORT" \
    -e BNSERVE_WORKERS=2 \
    -e BNSERVE_DRAIN_SECONDS="$DRAIN" \
    "$IMAGE")
bn_log "container ${CID:0:12} on $URL"
"$PY" "$here/check_container.py" wait --url "$URL" --timeout 90 --container "$CID"

phase "API checks"
"$PY" "$here/check_container.py" api --url "$URL" --model "$MODEL_NAME"

phase "gRPC checks"
# The image's own grpc and message classes, inside the container: readiness, metadata and one
# inference of an all-zero image through inference.GRPCInferenceService. No waiting: HTTP
# readiness (above) says yes only once a gRPC process serves.
docker exec -e GRPC_PORT="$GRPC_PORT" -e MODEL_NAME="$MODEL_NAME" "$CID" python -c '
import os, grpc, numpy as np
from bnserve.service import grpc_messages as pb
channel = grpc.insecure_channel("127.0.0.1:" + os.environ["GRPC_PORT"])
def call(method, request):
    service = pb.SERVICE.methods_by_name[method]
    stub = channel.unary_unary(f"/{pb.SERVICE.full_name}/{method}",
        request_serializer=pb.message(service.input_type.name).SerializeToString,
        response_deserializer=pb.message(service.output_type.name).FromString)
    return stub(request, timeout=10)
name = os.environ["MODEL_NAME"]
assert call("ServerReady", pb.message("ServerReadyRequest")()).ready
meta = call("ModelMetadata", pb.message("ModelMetadataRequest")(name=name))
(spec,) = meta.inputs
features = spec.shape[1]
request = pb.ModelInferRequest(model_name=name)
request.inputs.add(name=spec.name, datatype="FP32", shape=[1, features])
request.raw_input_contents.append(np.zeros((1, features), np.float32).tobytes())
response = call("ModelInfer", request)
scores = np.frombuffer(response.raw_output_contents[0], np.float32)
assert abs(float(scores.sum()) - 1.0) < 1e-4, scores
print(f"gRPC: ready, {name} v{response.model_version} answered {len(scores)} scores")
'

phase "process checks"
docker exec "$CID" python -c '
import os
def status(pid):
    fields = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
    return fields["Name"].strip(), fields["Uid"].split(), fields["PPid"].strip()
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid()))
for pid in pids:
    name, uids, ppid = status(pid)
    assert set(uids) == {"10001"}, f"pid {pid} ({name}) runs with uids {uids}"
cmd1 = open("/proc/1/cmdline", "rb").read().replace(b"\0", b" ").decode()
assert "bnserve" in cmd1 or "gunicorn" in cmd1, f"pid 1 is {cmd1!r}, not the server"
workers = [p for p in pids if p != 1 and status(p)[2] == "1"]
assert workers, "pid 1 has no worker processes"
# onnxruntime starts threads when imported; a worker forked from a master that imported it hangs
# at exit (a condition variable copied mid-wait), and docker stop then ends in SIGKILL.
maps = open("/proc/1/maps").read()
assert "onnxruntime" not in maps, "the gunicorn master loaded onnxruntime"
# grpc starts threads too: only the workers load it, after the fork
assert "cygrpc" not in maps, "the gunicorn master loaded grpc"
try:
    open("/opt/venv/probe", "w")
    raise SystemExit("the root filesystem is writable")
except OSError:
    pass
print(f"{len(pids)} processes, all uid 10001; pid 1: {cmd1.strip()}; {len(workers)} children of pid 1")
'
for _ in $(seq 1 40); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$CID")
    [[ $health == healthy ]] && break
    sleep 0.5
done
[[ $health == healthy ]] || {
    bn_log "HEALTHCHECK says '$health'"
    docker inspect -f '{{json .State.Health}}' "$CID" >&2
    exit 1
}
bn_log "docker HEALTHCHECK: healthy"

phase "docker stop under load"
stop_args=(--url "$URL" --container "$CID" --grace "$GRACE" --drain-seconds "$DRAIN")
[[ ${BN_REQUIRE_DRAIN:-1} != 0 ]] && stop_args+=(--require-drain)
"$PY" "$here/check_container.py" stop "${stop_args[@]}"
if docker logs "$CID" 2>&1 | grep -q 'Traceback'; then
    bn_log "tracebacks in the container log:"
    docker logs "$CID" 2>&1 | grep -A 15 Traceback | head -n 40 >&2
    exit 1
fi
phase "done"
