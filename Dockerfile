# bnserve: BN MLP trained in numpy, folded into ONNX, served over HTTP (and gRPC) by gunicorn +
# onnxruntime.
#
#   docker build -t bnserve .
#   docker run --rm -p 8000:8000 -p 8001:8001 --read-only --tmpfs /tmp bnserve
#
# Stages: "model" installs the package with the train extra, trains the default digits model and
# converts it (the converter's parity gate verifies the ONNX file against the checkpoint); "venv"
# installs the serving package alone into /opt/venv; the final stage copies the two onto a clean
# python:3.11-slim. The build stage's versions come from constraints.txt (the lock file CI installs
# from too); the runtime venv installs locks/serve.txt with --require-hashes. Both are written by
# deploy/lock.sh. Plain Dockerfile instructions only: it builds with the legacy builder and with
# BuildKit alike.
#
# The base image is a build argument so that it can be pinned by digest where a registry serves
# it (CI builds python:3.11-slim locally, where no registry digest exists):
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> -t bnserve .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS model
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY bnserve/ bnserve/
COPY models/ models/
COPY converter/ converter/
COPY service/ service/
# --no-compile: this stage is thrown away, its bytecode would only cost time.
RUN pip install --no-cache-dir --no-compile --constraint constraints.txt ".[train]"
# Train on scikit-learn's bundled digits data, convert and verify, and lay the result out as a
# model repository (/models/<name>/<version>/model.onnx), the layout KServe and Triton use too.
RUN bnserve train sklearn:digits --out /tmp/digits \
    && mkdir -p /models/digits/1 \
    && bnserve convert /tmp/digits/checkpoint.npz -o /models/digits/1/model.onnx \
    && python -c "import onnx, sys; onnx.checker.check_model(sys.argv[1], full_check=True)" \
        /models/digits/1/model.onnx

FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE locks/serve.txt ./
COPY bnserve/ bnserve/
COPY models/ models/
COPY converter/ converter/
COPY service/ service/
# The base (serving) install only: every file checked against the hashes in locks/serve.txt, then
# bnserve itself without dependencies; no trainer libraries, compilers or pip cache, and no pip in
# the venv itself (the base image's pip installs into it).
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes --no-deps \
        -r serve.txt \
    && pip --python /opt/venv/bin/python install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="bnserve" \
      org.opencontainers.image.description="BN MLP classifier served over HTTP (simple JSON API and Open Inference Protocol v2) and gRPC (Open Inference Protocol)" \
      org.opencontainers.image.licenses="MIT"
# Configuration: the same variables `bnserve serve` reads (its flags win). HOME points at the
# writable /tmp so that nothing tries to write into the read-only root filesystem; the metrics
# files of the gunicorn workers live under /tmp too.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    BNSERVE_MODEL=/models \
    BNSERVE_HOST=0.0.0.0 \
    BNSERVE_PORT=8000 \
    BNSERVE_GRPC_PORT=8001 \
    BNSERVE_DEVICE=cpu \
    BNSERVE_WORKER_CLASS=gevent \
    BNSERVE_LOG_LEVEL=info \
    BNSERVE_METRICS_DIR=/tmp/bnserve-metrics
COPY --from=venv /opt/venv /opt/venv
COPY --from=model /models /models
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 8001
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('BNSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["bnserve", "serve"]
