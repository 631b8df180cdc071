"""The serving cost of checking requests against the training profile: `bnserve serve` with
`--on-out-of-range flag` (the default: range check, drift binning) against `ignore`, both on the
same converted model (trained on sklearn:digits, so it carries a profile), one worker each,
`POST /predict` with one in-range example under `wrk -t1 -c8` keep-alive, rounds alternating
between the two servers. Printed: req/s per round, the medians and flag/ignore. Target >= 0.97x.

    python bench/profile_check.py [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = [sys.executable, "-m", "bnserve"]
        subprocess.run([*run, "train", "sklearn:digits", "--out", str(tmp / "run"), "--quiet",
                        "--epochs", "10"], check=True, cwd=ROOT)  # fmt: skip
        model = tmp / "digits.onnx"
        subprocess.run([*run, "convert", str(tmp / "run" / "checkpoint.npz"), "-o", str(model),
                        "-q"], check=True, cwd=ROOT)  # fmt: skip
        from sklearn.datasets import load_digits

        bench.BODY = json.dumps({"features": load_digits().data[0].tolist()}).encode()
        script = bench.wrk_script(tmp / "post.lua", bench.BODY, close=False)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        servers = {}
        rps: dict[str, list[float]] = {"flag": [], "ignore": []}
        try:  # servers started before a failure are stopped too
            for mode in ("flag", "ignore"):
                port = bench.free_port()
                argv_ = [*run, "serve", str(model), "--port", str(port), "--workers", "1",
                         "--on-out-of-range", mode, "--log-level", "warning", "--grpc-port", "0"]  # fmt: skip
                servers[mode] = bench.Server(mode, argv_, port, env, tmp / f"{mode}.log")
            for rnd in range(args.rounds):
                for mode in ("flag", "ignore") if rnd % 2 == 0 else ("ignore", "flag"):
                    result = bench.load_wrk(servers[mode].port, 8, args.seconds, script)
                    rps[mode].append(result["rps"])
                    print(f"round {rnd} {mode:<6} {result['rps']:8.0f} req/s  p99 "
                          f"{result['p99_ms']:.2f} ms  errors {result['errors']}")  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
    flag, ignore = statistics.median(rps["flag"]), statistics.median(rps["ignore"])
    print(f"\nmachine: {bench.machine()}")
    print(f"median req/s: flag {flag:.0f}, ignore {ignore:.0f}, flag/ignore {flag / ignore:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
