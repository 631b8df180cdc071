"""Which layout of a fused ensemble runs faster in onnxruntime: the members' layers after the wide
first Gemm as one batched MatMul over `[K, batch, width]` ("batched"), or as one Gemm with
block-diagonal weights over `[batch, K*width]` ("blockdiag", K times the multiply-adds, all but
1/K of them with zeros).

Random weights (speed does not depend on the values), the digits network's shape by default
(64-100-100-100-10, `bnserve train`'s default hidden widths), K = 3, 5, 10; one onnxruntime
session per graph with the options `bnserve serve` gives its sessions (one intra-op thread,
sequential, no spinning, ORT_ENABLE_ALL), and a single member's folded graph for scale. The
graphs are measured alternately, round after round, so that the load of a shared machine falls
on all alike; each figure is the median over the rounds.

    python bench/ensemble_layout.py [--rounds 7] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from bnserve.converter import export
from bnserve.converter.frozen import DenseLayer, FoldedMLP
from bnserve.converter.fuse import FusedEnsemble
from bnserve.service.runtime import session_options


def random_fused(widths: tuple[int, ...], K: int, seed: int = 0) -> FusedEnsemble:
    """K members of shape `widths` (features, hidden..., classes), fused, random weights."""
    rng = np.random.default_rng(seed)
    F, first = widths[0], widths[1]
    layers = [(rng.normal(0, F**-0.5, (F, K * first)), rng.normal(0, 0.1, K * first))]
    for a, b in itertools.pairwise(widths[1:]):
        layers.append((rng.normal(0, a**-0.5, (K, a, b)), rng.normal(0, 0.1, (K, b))))
    return FusedEnsemble(tuple(layers), K, "relu", 0.01)


def session(model: bytes) -> ort.InferenceSession:
    """A CPU session with the options `bnserve serve` gives its workers' sessions."""
    return ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])


def timed(run: Callable[[], object], seconds: float) -> np.ndarray:
    """Seconds per call of `run` over `seconds` (at least 50 calls), after 20 warm-up calls."""
    for _ in range(20):
        run()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 50:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return np.array(times)


def measure(
    variants: dict[str, Callable[[np.ndarray], object]],
    x1: np.ndarray,
    x64: np.ndarray,
    rounds: int,
    seconds: float,
) -> dict[str, dict[str, float]]:
    """Per variant (a function of the input rows): batch-1 p50 and p99 in µs and batch-64 rows/s,
    each the median over `rounds` rounds in which every variant runs once."""
    p50: dict[str, list[float]] = {v: [] for v in variants}
    p99: dict[str, list[float]] = {v: [] for v in variants}
    rows: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            t1 = timed(lambda f=run: f(x1), seconds)
            p50[name].append(float(np.percentile(t1, 50)) * 1e6)
            p99[name].append(float(np.percentile(t1, 99)) * 1e6)
            rows[name].append(64 / float(np.median(timed(lambda f=run: f(x64), seconds))))
    return {
        v: {
            "p50_us": float(np.median(p50[v])),
            "p99_us": float(np.median(p99[v])),
            "rows_per_s": float(np.median(rows[v])),
        }
        for v in variants
    }


def table(figures: dict[str, dict[str, float]], baseline: str) -> str:
    """A markdown table of `measure`'s figures, with each p50 over the `baseline` variant's."""
    base = figures[baseline]["p50_us"]
    lines = [
        f"| model | p50 batch 1 (µs) | p99 batch 1 (µs) | rows/s batch 64 | p50 / {baseline}'s |",
        "|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        lines.append(
            f"| {name} | {f['p50_us']:.1f} | {f['p99_us']:.1f} | {f['rows_per_s']:,.0f} | "
            f"{f['p50_us'] / base:.2f}x |"
        )
    return "\n".join(lines)


def single_member(widths: tuple[int, ...], seed: int = 0) -> bytes:
    """One member of that shape, folded as `bnserve convert` writes a single model."""
    rng = np.random.default_rng(seed)
    last = len(widths) - 2
    layers = tuple(
        DenseLayer(
            f"hidden.{i}" if i < last else "output",
            rng.normal(0, a**-0.5, (a, b)),
            rng.normal(0, 0.1, b),
            "relu" if i < last else None,
        )
        for i, (a, b) in enumerate(itertools.pairwise(widths))
    )
    return export.serialize(export.build_folded_model(FoldedMLP(layers, 0.01)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    ap.add_argument("--widths", default="64,100,100,100,10", help="features,hidden...,classes")
    ap.add_argument("--members", default="3,5,10")
    args = ap.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    print(
        f"onnxruntime {ort.__version__}, {platform.machine()}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f}; {args.rounds} rounds of {args.seconds} s per figure "
        f"(medians); network {'-'.join(map(str, widths))}\n"
    )
    rng = np.random.default_rng(1)
    x1 = rng.normal(size=(1, widths[0])).astype(np.float32)
    x64 = rng.normal(size=(64, widths[0])).astype(np.float32)
    sessions = {"one member": session(single_member(widths))}
    for K in (int(k) for k in args.members.split(",")):
        fused = random_fused(widths, K)
        for layout in export.ENSEMBLE_LAYOUTS:
            model = export.build_fused_model(fused, layout=layout)
            sessions[f"K={K} {layout}"] = session(export.serialize(model))
    variants = {
        name: (lambda x, s=sess: s.run(None, {"input": x})) for name, sess in sessions.items()
    }
    print(table(measure(variants, x1, x64, args.rounds, args.seconds), "one member"))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
