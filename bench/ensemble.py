"""Ensembles: what K members buy in test accuracy, and what the fused graph costs to serve.

Accuracy: for each data set and seed, `train_ensemble` trains the largest K once (the default
configuration of `bnserve train`, members in `--jobs` processes); the ensemble of the first K
members is exactly what `train --ensemble K --seed S` trains (member seeds depend only on S and
the member's index), so every K is scored from one run. Per K, averaged over the seeds: the
ensemble's test accuracy (mean of the members' probabilities), its members' mean, the best of its
members on the test rows (an oracle: chosen by looking at the test rows), and the member a user
would pick, the best on validation. With and without bagging.

Serving: the first seed's members of the first data set, converted (the parity gate included)
as one fused graph (`bnserve convert ENSEMBLE`) and as K separate models; onnxruntime on the CPU
with the session options of `bnserve serve` (one intra-op thread, ORT_ENABLE_ALL); batch-1 latency
(p50/p99 of single calls) and batch-64 rows/s of: one member alone, the fused graph, and K
sessions run one after the other with their probabilities averaged in numpy. Measured in rounds,
every variant once per round, medians over the rounds. Then over HTTP (`http_rows`): one
`bnserve serve` worker serving one member, the fused graph and the K members as K models, in
predictions/s under `wrk` (K requests per prediction for the K models).

    python bench/ensemble.py [--data sklearn:digits,sklearn:breast_cancer] [--seeds 0,1,2,3,4]
                             [--sizes 1,3,5,10] [--jobs N] [--rounds 5] [--seconds 0.5]
                             [--http-members 5] [--http-seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import serve as http_bench  # bench/serve.py, next to this script
from data_scale import cpu_name  # bench/data_scale.py, next to this script
from ensemble_layout import measure, session, table  # bench/ensemble_layout.py, next to this script

from bnserve.converter.convert import convert_checkpoint
from bnserve.converter.ensemble import convert_ensemble
from bnserve.models.checkpoint import save_checkpoint
from bnserve.models.data import load_dataset
from bnserve.models.ensemble import EnsembleResult, average_proba, train_ensemble, write_ensemble
from bnserve.models.train import TrainConfig


def accuracy_rows(
    source: str, seeds: list[int], sizes: list[int], jobs: int, bagging: bool
) -> tuple[dict[int, dict[str, float]], EnsembleResult]:
    """Per K, the figures averaged over `seeds`; and the first seed's run (for serving)."""
    per_k: dict[int, dict[str, list[float]]] = {k: {} for k in sizes}
    first = None
    for seed in seeds:
        t0 = time.perf_counter()
        run = train_ensemble(
            TrainConfig(seed=seed, bagging=bagging), load_dataset(source), max(sizes), jobs=jobs
        )
        first = first or run
        splits = run.splits
        assert splits is not None and splits.y_test is not None
        ckpts = [m.checkpoint for m in run.members]
        for k in sizes:
            probs = average_proba(ckpts[:k], splits.X_test)
            members = run.members[:k]
            test = [m.metrics["test_accuracy"] for m in members]
            val = [m.metrics["val_accuracy"] for m in members]
            figures = {
                "ensemble": float((probs.argmax(axis=1) == splits.y_test).mean()),
                "members_mean": float(np.mean(test)),
                "best_member_on_test": max(test),
                "best_member_on_val": test[int(np.argmax(val))],
            }
            for key, value in figures.items():
                per_k[k].setdefault(key, []).append(value)
        print(
            f"  {source} seed {seed}{' bagging' if bagging else ''}: {max(sizes)} members in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    assert first is not None
    return {k: {key: float(np.mean(v)) for key, v in f.items()} for k, f in per_k.items()}, first


def convert_member(run: EnsembleResult, i: int, tmp: Path, out: Path) -> Path:
    """Member `i` converted as a single model to `out` (its checkpoint saved under `tmp`)."""
    save_checkpoint(run.members[i].checkpoint, tmp / f"m{i}.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_checkpoint(tmp / f"m{i}.npz", out)
    return out


def convert_fused(run: EnsembleResult, k: int, tmp: Path, out: Path) -> Path:
    """The first `k` members as one fused graph at `out`, through their manifest (what `train
    --ensemble K` writes and `bnserve convert ENSEMBLE` reads)."""
    part = EnsembleResult(run.config, run.members[:k], run.seeds[:k], {})
    manifest = write_ensemble(
        part,
        tmp / f"ens{k}",
        lambda r, folder: save_checkpoint(r.checkpoint, folder / "checkpoint.npz"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_ensemble(manifest, out)
    return out


def serving_rows(
    run: EnsembleResult, sizes: list[int], rounds: int, seconds: float
) -> dict[str, dict[str, float]]:
    """Latency and throughput of one member, and per K the fused graph and K sessions."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        singles = [
            session(convert_member(run, i, tmp, tmp / f"m{i}.onnx").read_bytes())
            for i in range(min(max(sizes), len(run.members)))
        ]
        fused = {
            k: session(convert_fused(run, k, tmp, tmp / f"ens{k}.onnx").read_bytes()) for k in sizes
        }
    assert run.splits is not None
    rng = np.random.default_rng(0)
    X = run.splits.X_test.astype(np.float32)
    x1, x64 = X[:1], X[rng.integers(0, len(X), 64)]

    def separate(k: int, x: np.ndarray) -> np.ndarray:
        return np.mean([s.run(None, {"input": x})[0] for s in singles[:k]], axis=0)

    variants = {"one member": lambda x: singles[0].run(None, {"input": x})}
    for k in sizes:
        variants[f"fused K={k}"] = lambda x, s=fused[k]: s.run(None, {"input": x})
        if k > 1:
            variants[f"{k} sessions"] = lambda x, k=k: separate(k, x)
    return measure(variants, x1, x64, rounds, seconds)


def http_rows(run: EnsembleResult, k: int, rounds: int, seconds: float) -> dict[str, float]:
    """Predictions/s over HTTP (`POST /models/{m}/predict`, one test row, `wrk -t1 -c8`
    keep-alive) of one member, the fused K-member graph, and the K members served as K models
    (what a user does by hand: K requests per prediction, averaged by the client, so
    predictions/s is requests/s over K); one `bnserve serve` worker serves all of them, the
    variants alternate round after round; medians over the rounds."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = tmp / "repo"
        for i in range(min(k, len(run.members))):
            convert_member(run, i, tmp, repo / f"member{i}" / "1" / "model.onnx")
        convert_fused(run, k, tmp, repo / "fused" / "1" / "model.onnx")
        assert run.splits is not None
        http_bench.BODY = json.dumps({"features": run.splits.X_test[0].tolist()}).encode()
        members = [f"/models/member{i}/predict" for i in range(k)]
        variants = {  # name: (wrk script, path, requests per prediction)
            "one member": (http_bench.wrk_script(tmp / "a.lua", http_bench.BODY, False), members[0], 1),
            f"fused K={k}": (http_bench.wrk_script(tmp / "b.lua", http_bench.BODY, False), "/models/fused/predict", 1),
            f"{k} models": (http_bench.wrk_script(tmp / "c.lua", http_bench.BODY, False, members), members[0], k),
        }  # fmt: skip
        port = http_bench.free_port()
        argv = [sys.executable, "-m", "bnserve", "serve", str(repo), "--port", str(port),
                "--workers", "1", "--grpc-port", "0", "--log-level", "warning"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": http_bench.python_path()}
        server = http_bench.Server("ensemble", argv, port, env, tmp / "serve.log", members[0])
        per_round: dict[str, list[float]] = {name: [] for name in variants}
        try:
            for rnd in range(rounds):
                for name in list(variants)[:: 1 if rnd % 2 == 0 else -1]:
                    script, path, requests = variants[name]
                    result = http_bench.load_wrk(port, 8, seconds, script, path)
                    if result["errors"]:
                        raise RuntimeError(f"{name}: {result['errors']} failed requests")
                    per_round[name].append(result["rps"] / requests)
        finally:
            server.stop()
    return {name: float(np.median(v)) for name, v in per_round.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sklearn:digits,sklearn:breast_cancer")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--sizes", default="1,3,5,10")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    ap.add_argument("--http-members", type=int, default=5, help="K of the HTTP comparison")
    ap.add_argument("--http-seconds", type=float, default=5.0, help="wrk time per measurement")
    args = ap.parse_args()
    sources = args.data.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(k) for k in args.sizes.split(",")]
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"seeds {seeds}; default training configuration; {args.jobs} processes\n",
        flush=True,
    )
    accuracy = [
        "| data | K | ensemble | members' mean | best member (on test) | member best on val "
        "| bagged ensemble | bagged members' mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    serving_run = None
    for source in sources:
        plain, run = accuracy_rows(source, seeds, sizes, args.jobs, bagging=False)
        bagged, _ = accuracy_rows(source, seeds, sizes, args.jobs, bagging=True)
        serving_run = serving_run or run
        for k in sizes:
            p, b = plain[k], bagged[k]
            accuracy.append(
                f"| `{source}` | {k} | {p['ensemble']:.4f} | {p['members_mean']:.4f} | "
                f"{p['best_member_on_test']:.4f} | {p['best_member_on_val']:.4f} | "
                f"{b['ensemble']:.4f} | {b['members_mean']:.4f} |"
            )
    print("\ntest accuracy, mean over seeds\n" + "\n".join(accuracy), flush=True)
    assert serving_run is not None
    serving = serving_rows(serving_run, sizes, args.rounds, args.seconds)
    print(f"\nserving {sources[0]} (load average {os.getloadavg()[0]:.1f})")
    print(table(serving, "one member"), flush=True)
    http = http_rows(serving_run, args.http_members, args.rounds, args.http_seconds)
    print(f"\nover HTTP, one worker (load average {os.getloadavg()[0]:.1f})")
    print("| served as | predictions/s | / one member's |\n|---|---|---|")
    for name, rate in http.items():
        print(f"| {name} | {rate:,.0f} | {rate / http['one member']:.2f}x |")


if __name__ == "__main__":
    main()
