"""Train one architecture with BN before, after and none at several learning rates (same seeds,
same split) to show what BN does to training speed and learning-rate tolerance."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from typing import Any

from bnserve.models.data import Dataset
from bnserve.models.train import TrainConfig, train

PLACEMENTS = ("none", "before", "after")


def _run(config: TrainConfig, data: Dataset) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        result = train(config, data)
    return {"history": result.history, "metrics": result.metrics}


def epochs_to_target(history: list[dict[str, float]], target: float) -> int | None:
    """First epoch whose validation accuracy reaches `target` (None if never)."""
    for row in history:
        if row["val_accuracy"] >= target:
            return int(row["epoch"])
    return None


def compare(
    data: Dataset,
    base: TrainConfig,
    lrs: list[float],
    target: float = 0.9,
    jobs: int = 1,
    on_run: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (learning rate, placement): final metrics, epochs to target, the history."""
    runs = [(lr, bn, replace(base, lr=lr, bn=bn)) for lr in lrs for bn in PLACEMENTS]
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(jobs, get_context("fork")) as pool:
        futures = [pool.submit(_run, config, data) for _, _, config in runs]
        for (lr, bn, _), future in zip(runs, futures, strict=True):
            out = future.result()
            m = out["metrics"]
            rows.append(
                {
                    "lr": lr,
                    "bn": bn,
                    "test_accuracy": m["test_accuracy"],
                    "val_accuracy": m["val_accuracy"],
                    "final_train_loss": out["history"][-1]["train_loss"],
                    "epochs_to_target": epochs_to_target(out["history"], target),
                    "epochs": m["epochs"],
                    "diverged": m["diverged"],
                    "history": out["history"],
                }
            )
            if on_run:
                on_run()
    return rows
