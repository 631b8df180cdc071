"""Training steps per second: our numpy trainer against PyTorch 2.13 on the CPU, same run.

Same architecture, batch size, optimizer (Adam), BN "before", dtype and thread count on both sides.
Prints a table with the ratio ours/PyTorch, the BLAS kernel numpy ran (threadpoolctl) and the
library versions. OPENBLAS_CORETYPE, when set, applies to both sides alike (they share the process).

    python bench/train_speed.py [--seconds 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from bnserve.models.network import NetworkSpec, init_params, loss_and_grads
from bnserve.models.optim import Adam

NETWORKS = {
    "small": dict(n_features=64, hidden=(100, 100, 100), n_classes=10, batch=100),
    "large": dict(n_features=784, hidden=(1024, 1024), n_classes=10, batch=256),
}


def timed_steps(step, seconds: float) -> float:
    """Steps per second of `step()`, after a warm-up, over about `seconds`."""
    for _ in range(5):
        step()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 10:
        step()
        n += 1
    return n / elapsed


def ours(net: dict, dtype: type, rng: np.random.Generator):
    spec = NetworkSpec(net["n_features"], net["n_classes"], net["hidden"], "relu", "before")
    params = init_params(spec, rng, dtype)
    opt = Adam()
    X = rng.standard_normal((net["batch"], net["n_features"])).astype(dtype)
    y = rng.integers(0, net["n_classes"], net["batch"])

    def step() -> None:
        _, grads, _ = loss_and_grads(spec, params, X, y)
        opt.step(params, grads, 1e-3)

    return step


def pytorch(net: dict, dtype: type, rng: np.random.Generator):
    tdtype = torch.float32 if dtype is np.float32 else torch.float64
    mods: list[torch.nn.Module] = []
    fan_in = net["n_features"]
    for width in net["hidden"]:
        mods += [
            torch.nn.Linear(fan_in, width, bias=False),
            torch.nn.BatchNorm1d(width),
            torch.nn.ReLU(),
        ]
        fan_in = width
    model = torch.nn.Sequential(*mods, torch.nn.Linear(fan_in, net["n_classes"])).to(tdtype).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    X = torch.from_numpy(rng.standard_normal((net["batch"], net["n_features"]))).to(tdtype)
    y = torch.from_numpy(rng.integers(0, net["n_classes"], net["batch"]))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        opt.step()

    return step


def blas_description() -> str:
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(
        f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {os.path.basename(i.get('filepath', ''))})"
        for i in infos
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--quick", action="store_true", help="small network, float32 only")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores; "
        f"numpy {np.__version__}, torch {torch.__version__}"
    )
    print(f"numpy BLAS: {blas_description()}")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}\n")
    header = f"{'network':<7} {'dtype':<8} {'threads':>7} {'ours steps/s':>13} {'torch steps/s':>14} {'ours/torch':>10}"
    print(header)
    print("-" * len(header))
    networks = ["small"] if args.quick else list(NETWORKS)
    dtypes = [np.float32] if args.quick else [np.float32, np.float64]
    for name in networks:
        for dtype in dtypes:
            for threads in sorted({1, cores}):
                rng = np.random.default_rng(0)
                torch.set_num_threads(threads)
                with threadpool_limits(threads):
                    a = timed_steps(ours(NETWORKS[name], dtype, rng), args.seconds)
                    b = timed_steps(pytorch(NETWORKS[name], dtype, rng), args.seconds)
                print(
                    f"{name:<7} {dtype.__name__:<8} {threads:>7} {a:>13.1f} {b:>14.1f} {a / b:>10.2f}"
                )


if __name__ == "__main__":
    main()
