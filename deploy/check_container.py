"""Host-side checks of a running bnserve container, used by deploy/ci-image-test.sh.

Standard library only (it runs with whatever python3 the host has):

  check_container.py wait  --url URL [--timeout S] [--container ID]
  check_container.py api   --url URL --model NAME
  check_container.py stop  --url URL --container ID --grace S

`wait` polls /v2/health/ready; `api` sends /predict and a V2 infer with two digits from scikit-learn's
data set and checks the answers against each other; `stop` runs `docker stop` while a client keeps
sending /predict and polling readiness, and checks that the container drained and exited cleanly
within the grace period. Each prints what it measured and exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import subprocess
import sys
import threading
import time
import urllib.parse

# scikit-learn's digits data set, rows 0 (a "0") and 1 (a "1"): 8x8 images, values 0..16.
DIGIT_0 = [
    0,
    0,
    5,
    13,
    9,
    1,
    0,
    0,
    0,
    0,
    13,
    15,
    10,
    15,
    5,
    0,
    0,
    3,
    15,
    2,
    0,
    11,
    8,
    0,
    0,
    4,
    12,
    0,
    0,
    8,
    8,
    0,
    0,
    5,
    8,
    0,
    0,
    9,
    8,
    0,
    0,
    4,
    11,
    0,
    1,
    12,
    7,
    0,
    0,
    2,
    14,
    5,
    10,
    12,
    0,
    0,
    0,
    0,
    6,
    13,
    10,
    0,
    0,
    0,
]
DIGIT_1 = [
    0,
    0,
    0,
    12,
    13,
    5,
    0,
    0,
    0,
    0,
    0,
    11,
    16,
    9,
    0,
    0,
    0,
    0,
    3,
    15,
    16,
    6,
    0,
    0,
    0,
    7,
    15,
    16,
    16,
    2,
    0,
    0,
    0,
    0,
    1,
    16,
    16,
    3,
    0,
    0,
    0,
    0,
    1,
    16,
    16,
    6,
    0,
    0,
    0,
    0,
    1,
    16,
    16,
    6,
    0,
    0,
    0,
    0,
    0,
    11,
    16,
    10,
    0,
    0,
]


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[check] {msg}", file=sys.stderr, flush=True)


def request(url: str, method: str = "GET", path: str = "/", body=None, timeout: float = 5.0):
    """One request on a fresh connection; returns (status, parsed JSON or raw text)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return resp.status, payload
    finally:
        conn.close()


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def container_running(cid: str) -> bool:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Running}}", cid], capture_output=True, text=True
    )
    return out.returncode == 0 and out.stdout.strip() == "true"


def cmd_wait(args) -> None:
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < args.timeout:
        try:
            status, _ = request(args.url, path="/v2/health/ready", timeout=2)
            if status == 200:
                log(f"ready after {time.monotonic() - start:.1f} s")
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if args.container and not container_running(args.container):
            raise CheckFailed(f"container exited before it was ready (last: {last})")
        time.sleep(0.25)
    raise CheckFailed(f"not ready within {args.timeout} s (last: {last})")


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def cmd_api(args) -> None:
    url, model = args.url, args.model

    status, body = request(url, path="/health")
    expect(status == 200, f"/health answered {status}: {body}")
    status, _ = request(url, path="/v2/health/live")
    expect(status == 200, f"/v2/health/live answered {status}")

    # Simple API, one example.
    status, one = request(url, "POST", "/predict", {"features": DIGIT_0})
    expect(status == 200, f"POST /predict answered {status}: {one}")
    expect(
        isinstance(one, dict) and {"label", "class_index", "probabilities"} <= one.keys(),
        f"/predict body lacks label/class_index/probabilities: {one}",
    )
    expect(
        one["class_index"] == 0 and str(one["label"]) == "0",
        f"/predict on a '0' answered label {one['label']!r} (class {one['class_index']})",
    )
    probs0 = one["probabilities"]
    expect(abs(sum(probs0.values()) - 1.0) < 1e-4, f"probabilities do not sum to 1: {probs0}")
    expect(max(probs0.values()) > 0.5, f"the model is not confident on a training digit: {probs0}")
    log(f"/predict: label {one['label']} p={max(probs0.values()):.4f} model={one.get('model')}")

    # Simple API, a batch.
    status, batch = request(url, "POST", "/predict", {"instances": [DIGIT_0, DIGIT_1]})
    expect(status == 200, f"POST /predict with instances answered {status}: {batch}")
    preds = batch["predictions"]
    expect(
        [p["class_index"] for p in preds] == [0, 1],
        f"/predict batch answered classes {[p['class_index'] for p in preds]}, expected [0, 1]",
    )

    # Open Inference Protocol: metadata, then infer.
    status, meta = request(url, path=f"/v2/models/{model}")
    expect(status == 200, f"GET /v2/models/{model} answered {status}: {meta}")
    expect(meta.get("name") == model, f"model metadata names {meta.get('name')!r}, not {model!r}")
    inp = meta["inputs"][0]
    status, ready = request(url, path=f"/v2/models/{model}/ready")
    expect(status == 200, f"GET /v2/models/{model}/ready answered {status}: {ready}")
    req = {
        "id": "ci-image-test",
        "inputs": [
            {"name": inp["name"], "shape": [2, 64], "datatype": "FP32", "data": DIGIT_0 + DIGIT_1}
        ],
    }
    status, res = request(url, "POST", f"/v2/models/{model}/infer", req)
    expect(status == 200, f"POST /v2/models/{model}/infer answered {status}: {res}")
    expect(res.get("id") == "ci-image-test", f"infer did not echo the id: {res.get('id')!r}")
    expect(res.get("model_name") == model, f"infer names model {res.get('model_name')!r}")
    outputs = {o["name"]: o for o in res["outputs"]}
    out = outputs.get("probabilities") or next(iter(outputs.values()))
    expect(
        out["shape"][0] == 2 and len(out["data"]) == 2 * out["shape"][1],
        f"infer output has shape {out['shape']} and {len(out['data'])} values",
    )
    k = out["shape"][1]
    rows = [out["data"][:k], out["data"][k:]]
    if any(abs(sum(r) - 1.0) > 1e-3 for r in rows):  # logits: the simple API applies a softmax
        rows = [softmax(r) for r in rows]
    argmax = [max(range(k), key=r.__getitem__) for r in rows]
    expect(argmax == [0, 1], f"V2 infer answered classes {argmax}, expected [0, 1]")
    # Compare per class: by label when the labels are the class indices (digits), else in order.
    keys = [str(i) for i in range(k)]
    simple = [probs0[c] for c in keys] if set(keys) == set(probs0) else list(probs0.values())
    diff = max(abs(a - b) for a, b in zip(rows[0], simple, strict=True))
    expect(diff < 1e-5, f"V2 and /predict disagree on the same example by {diff:g}")
    log(
        f"V2 infer: output {out['name']!r} shape {out['shape']} classes {argmax}, "
        f"max |V2 - /predict| = {diff:.2g}"
    )


def cmd_stop(args) -> None:
    url = args.url
    stats = {
        "predict_ok": 0,
        "predict_refused": 0,
        "predict_bad": [],
        "ready_503": 0,
        "ok_while_not_ready": 0,
    }
    stop_sent = threading.Event()
    done = threading.Event()

    def client() -> None:
        not_ready_seen = False
        while not done.is_set():
            try:
                rs, _ = request(url, path="/v2/health/ready", timeout=5)
                if rs == 503 and stop_sent.is_set():
                    stats["ready_503"] += 1
                    not_ready_seen = True
            except OSError:
                pass
            try:
                status, body = request(url, "POST", "/predict", {"features": DIGIT_0}, timeout=10)
            except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
                # gunicorn closes its listening socket when it stops: new connections are refused
                # (or reset, when one raced into the backlog as it closed). That is the end.
                if stop_sent.is_set():
                    stats["predict_refused"] += 1
                    return
                time.sleep(0.05)
                continue
            except OSError as exc:
                stats["predict_bad"].append(f"{type(exc).__name__}: {exc}")
                return
            if status == 200 and isinstance(body, dict) and body.get("class_index") == 0:
                stats["predict_ok"] += 1
                if not_ready_seen:
                    stats["ok_while_not_ready"] += 1
            else:
                stats["predict_bad"].append(f"HTTP {status}: {str(body)[:200]}")

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(0.5)
    before = stats["predict_ok"]
    expect(before > 0, f"no successful /predict before the stop: {stats['predict_bad'][:3]}")
    start = time.monotonic()
    stop_sent.set()
    proc = subprocess.run(
        ["docker", "stop", "-t", str(args.grace), args.container], capture_output=True, text=True
    )
    elapsed = time.monotonic() - start
    done.set()
    thread.join(timeout=15)
    expect(proc.returncode == 0, f"docker stop failed: {proc.stderr.strip()}")
    insp = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", args.container],
        capture_output=True,
        text=True,
        check=True,
    )
    code, oom = insp.stdout.split()
    log(
        f"docker stop took {elapsed:.2f} s (grace {args.grace} s), exit code {code}; "
        f"/predict ok {stats['predict_ok']} ({stats['predict_ok'] - before} after SIGTERM, "
        f"{stats['ok_while_not_ready']} while readiness said 503), readiness 503 seen "
        f"{stats['ready_503']} times, refused {stats['predict_refused']}"
    )
    expect(
        not stats["predict_bad"], f"requests failed during the drain: {stats['predict_bad'][:5]}"
    )
    expect(
        elapsed < args.grace,
        f"docker stop took {elapsed:.1f} s: the grace period ran out and the container was killed",
    )
    expect(
        code == "0" and oom == "false",
        f"the container exited with code {code} (OOM killed: {oom}), not 0",
    )
    if args.drain_seconds > 0:
        if stats["ready_503"] == 0:
            msg = (
                f"BNSERVE_DRAIN_SECONDS={args.drain_seconds}, but readiness never answered 503 "
                "after SIGTERM"
            )
            if args.require_drain:
                raise CheckFailed(msg)
            log(f"warning: {msg} (no drain phase in this service yet?)")
        else:
            expect(
                stats["ok_while_not_ready"] > 0,
                "readiness answered 503, but no /predict succeeded during the drain",
            )
            expect(
                elapsed >= args.drain_seconds * 0.9,
                f"stopped after {elapsed:.1f} s, before the {args.drain_seconds} s drain",
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--url", required=True)
    w.add_argument("--timeout", type=float, default=60)
    w.add_argument("--container")
    a = sub.add_parser("api")
    a.add_argument("--url", required=True)
    a.add_argument("--model", required=True)
    s = sub.add_parser("stop")
    s.add_argument("--url", required=True)
    s.add_argument("--container", required=True)
    s.add_argument("--grace", type=int, default=20)
    s.add_argument("--drain-seconds", type=float, default=0)
    s.add_argument("--require-drain", action="store_true")
    args = p.parse_args(argv)
    try:
        {"wait": cmd_wait, "api": cmd_api, "stop": cmd_stop}[args.cmd](args)
    except CheckFailed as exc:
        log(f"FAILED: {exc}")
        return 1
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        log(f"FAILED: unexpected answer shape ({type(exc).__name__}: {exc})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
