"""Random hyperparameter search, coarse to fine (batchnorm.md section 8).

Continuous hyperparameters are sampled on a log scale: the learning rate as `10**U(a, b)`, Adam's
beta1 (and the Momentum coefficient) as `1 - 10**U(c, d)`, the weight decay as `10**U(e, f)`.
Each round after the first samples in a box shrunk around the best trials of the rounds before.
Trials run in worker processes with their BLAS limited to one thread, and every finished trial is
appended to `trials.csv` at once, so an interrupted search keeps its results and `--resume`
continues it (trial configurations are a pure function of the seed and earlier results).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.errors import BnserveError, UsageError, require_extra
from bnserve.models.train import TrainConfig

CSV_FIELDS = [
    "trial", "round", "seed", "lr", "beta1", "weight_decay", "hidden", "batch_size", "bn",
    "status", "val_accuracy", "val_loss", "test_accuracy", "train_accuracy", "epochs", "seconds",
]  # fmt: skip


@dataclass(frozen=True)
class SearchSpace:
    """The box to sample from. Log ranges are `(log10 low, log10 high)`."""

    lr_log10: tuple[float, float] = (-4.0, -1.0)
    one_minus_beta1_log10: tuple[float, float] = (-3.0, -1.0)
    weight_decay_log10: tuple[float, float] = (-6.0, -2.0)
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 2, 3)
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256)
    placements: tuple[str, ...] = ("before", "after", "none")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}


LOG_AXES = ("lr_log10", "one_minus_beta1_log10", "weight_decay_log10")


def sample(space: SearchSpace, rng: np.random.Generator) -> dict[str, Any]:
    """One random point of the box (log-uniform for the continuous axes)."""
    depth = int(rng.choice(space.depths))
    width = int(rng.choice(space.widths))
    return {
        "lr": float(10 ** rng.uniform(*space.lr_log10)),
        "beta1": float(1 - 10 ** rng.uniform(*space.one_minus_beta1_log10)),
        "weight_decay": float(10 ** rng.uniform(*space.weight_decay_log10)),
        "hidden": (width,) * depth,
        "batch_size": int(rng.choice(space.batch_sizes)),
        "bn": str(rng.choice(space.placements)),
    }


def _exponents(trial: dict[str, Any]) -> dict[str, float]:
    return {
        "lr_log10": math.log10(trial["lr"]),
        "one_minus_beta1_log10": math.log10(1 - trial["beta1"]),
        "weight_decay_log10": math.log10(trial["weight_decay"]),
    }


def shrink(space: SearchSpace, best: list[dict[str, Any]], factor: float = 0.5) -> SearchSpace:
    """A box around the `best` trials: each log axis at most `factor` times its old width, centred
    on the best trials and clipped to the old box; each set axis keeps the values they used."""
    if not best:
        return space
    changes: dict[str, Any] = {}
    for axis in LOG_AXES:
        lo, hi = getattr(space, axis)
        values = [_exponents(t)[axis] for t in best]
        width = min(factor * (hi - lo), max(values) - min(values) + 0.2 * (hi - lo))
        centre = (min(values) + max(values)) / 2
        new_lo = max(lo, centre - width / 2)
        new_hi = min(hi, new_lo + width)
        new_lo = max(lo, new_hi - width)
        changes[axis] = (new_lo, new_hi)
    changes["widths"] = tuple(sorted({t["hidden"][0] for t in best}))
    changes["depths"] = tuple(sorted({len(t["hidden"]) for t in best}))
    changes["batch_sizes"] = tuple(sorted({t["batch_size"] for t in best}))
    changes["placements"] = tuple(p for p in space.placements if p in {t["bn"] for t in best})
    return replace(space, **changes)


def trials_per_round(trials: int, rounds: int) -> list[int]:
    base, extra = divmod(trials, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def trial_seed(seed: int, trial: int) -> int:
    return int(np.random.SeedSequence([seed, trial]).generate_state(1)[0])


def rank_key(row: dict[str, Any]) -> tuple[float, float, int]:
    """Higher validation accuracy first; among equal accuracies lower validation loss (a missing
    or NaN loss last); among equal both the earlier trial, so the order does not depend on which
    process finished first."""
    loss = row.get("val_loss")
    if loss is None or math.isnan(loss):
        loss = math.inf
    return (-row["val_accuracy"], loss, row["trial"])


def best_trials(rows: Iterable[dict[str, Any]], keep: float) -> list[dict[str, Any]]:
    """The top `keep` fraction (at least 2) of finished trials by validation accuracy, then loss."""
    done = sorted((r for r in rows if r["status"] == "ok"), key=rank_key)
    return done[: max(2, math.ceil(keep * len(done)))]


def without_negative_zero(row: dict[str, Any]) -> dict[str, Any]:
    """The row with -0.0 written as 0.0 (a loss of a perfectly confident model is computed as
    -0.0; trials.csv, best.json and the summary line must not show the sign)."""
    return {k: v + 0.0 if isinstance(v, float) else v for k, v in row.items()}


# --- running trials -----------------------------------------------------------------------------

_worker_cache: dict[str, Any] = {}


def _init_worker() -> None:
    """One BLAS thread per trial process, so parallel trials do not oversubscribe the cores."""
    from threadpoolctl import threadpool_limits

    _worker_cache["limits"] = threadpool_limits(1)


@contextmanager
def trial_pool(jobs: int, dask: str | None) -> Iterator[tuple[Callable, Callable]]:
    """`(submit, as_completed)` of the engine that runs the trials: forked local processes, or a
    Dask cluster (`dask`: a scheduler address such as tcp://host:8786, or "local"). A Dask worker
    must see the data file at the same path (a shared file system) and have bnserve installed."""
    if dask is None:
        with ProcessPoolExecutor(jobs, get_context("fork"), initializer=_init_worker) as pool:
            yield pool.submit, as_completed
        return
    require_extra("distributed", "dask", "tune --dask")
    from distributed import Client, LocalCluster
    from distributed import as_completed as dask_completed

    cluster = None
    if dask == "local":
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True)
    client = Client(cluster if cluster is not None else dask)
    try:
        # pure=False: two trials with equal arguments are still two runs
        yield (lambda fn, *args: client.submit(fn, *args, pure=False)), dask_completed
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_trial(
    data_source: str, base: dict[str, Any], point: dict[str, Any], trial: int, rnd: int
) -> dict[str, Any]:
    """Train one configuration; failures become a row with a status, never an exception."""
    from bnserve.models.data import load_dataset
    from bnserve.models.train import train

    options = TrainConfig(**base).column_options()
    if "limits" not in _worker_cache:  # a Dask worker: no pool initializer ran
        _init_worker()
    key = f"{data_source}|{base.get('label')}|{options}"
    if key not in _worker_cache:
        _worker_cache[key] = load_dataset(data_source, base.get("label"), options)
    row: dict[str, Any] = {"trial": trial, "round": rnd, "seed": base["seed"], **point}
    try:
        config = TrainConfig(**{**base, **point, "momentum": point["beta1"]})
        result = train(config, _worker_cache[key])
        m = result.metrics
        row.update(
            status="ok",
            val_accuracy=m["val_accuracy"],
            val_loss=m["val_loss"],
            test_accuracy=m["test_accuracy"],
            train_accuracy=m["train_accuracy"],
            epochs=m["epochs"],
            seconds=m["seconds"],
        )
    except (BnserveError, ValueError) as e:
        row.update(status=f"failed: {e}", val_accuracy=0.0, val_loss=math.inf)
    return without_negative_zero(row)


def read_trials(path: Path) -> list[dict[str, Any]]:
    """Rows of an existing trials.csv, typed back (a row cut short by a crash is skipped)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            if None in raw.values() or not raw.get("status"):
                continue
            row: dict[str, Any] = dict(raw)
            for k in ("trial", "round", "seed", "batch_size", "epochs"):
                row[k] = int(float(raw[k])) if raw[k] not in ("", "None") else None
            for k in ("lr", "beta1", "weight_decay", "val_accuracy", "val_loss"):
                row[k] = float(raw[k]) if raw[k] not in ("", "None") else math.nan
            # optional figures (empty for a failed trial): numbers again, or None, so that a
            # best.json written after --resume holds numbers, not strings
            for k in ("test_accuracy", "train_accuracy", "seconds"):
                row[k] = float(raw[k]) if raw[k] not in ("", "None") else None
            row["hidden"] = tuple(int(w) for w in raw["hidden"].split("x"))
            rows.append(without_negative_zero(row))
    return rows


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k, "") for k in CSV_FIELDS}
    out["hidden"] = "x".join(str(w) for w in row["hidden"])
    return out


@dataclass
class SearchResult:
    rows: list[dict[str, Any]]
    boxes: list[SearchSpace]
    best: dict[str, Any] | None


def search(
    data_source: str,
    out: Path,
    base: dict[str, Any],
    space: SearchSpace,
    trials: int = 40,
    rounds: int = 2,
    jobs: int | None = None,
    seed: int = 0,
    keep: float = 0.25,
    resume: bool = False,
    on_trial: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None,
    dask: str | None = None,
) -> SearchResult:
    """Run the search, appending to `out/trials.csv`; returns every row, the box of each round
    and the best trial. Trials run in `jobs` local processes, or on a Dask cluster (`dask`: a
    scheduler address, or "local" for a LocalCluster of `jobs` processes): the same trials, the
    same rows and the same resume rules either way."""
    if rounds < 1 or trials < rounds:
        raise UsageError(
            f"need at least one trial per round (--trials {trials}, --rounds {rounds})"
        )
    csv_path = out / "trials.csv"
    rows: list[dict[str, Any]] = []
    if csv_path.exists():
        if not resume:
            raise UsageError(
                f"{csv_path} exists; pass --resume to continue that search or choose another --out"
            )
        rows = read_trials(csv_path)
    done = {r["trial"] for r in rows}
    out.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    jobs = jobs or os.cpu_count() or 1
    boxes: list[SearchSpace] = []
    box = space
    first_trial = 0
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
        if new_file:
            writer.writeheader()
            f.flush()
        for rnd, count in enumerate(trials_per_round(trials, rounds)):
            if rnd > 0:
                box = shrink(box, best_trials([r for r in rows if r["round"] < rnd], keep))
            boxes.append(box)
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, rnd]))
            points = [(first_trial + i, sample(box, rng)) for i in range(count)]
            first_trial += count
            _check_resumed(rows, points, rnd, csv_path)
            todo = [(t, p) for t, p in points if t not in done]
            base_round = {**base, "split_seed": seed}
            with trial_pool(jobs, dask) as (submit, completed):
                futures = [
                    submit(
                        run_trial,
                        data_source,
                        {**base_round, "seed": trial_seed(seed, t)},
                        p,
                        t,
                        rnd,
                    )
                    for t, p in todo
                ]
                for future in completed(futures):
                    row = future.result()
                    writer.writerow(_csv_row(row))
                    f.flush()  # a finished trial is on disk before the next one is awaited
                    rows.append(row)
                    if on_trial:
                        on_trial(row, (best_trials(rows, 0) or [None])[0])
    ranked = best_trials(rows, 0)
    return SearchResult(rows, boxes, ranked[0] if ranked else None)


def _check_resumed(
    rows: list[dict[str, Any]], points: list[tuple[int, dict[str, Any]]], rnd: int, csv_path: Path
) -> None:
    """A resumed trial must be the one this search would run under that number: otherwise the
    file comes from another search (other --seed, --trials, --rounds or ranges) and skipping its
    trial numbers would silently mix two searches."""
    stored = {r["trial"]: r for r in rows}
    for t, p in points:
        r = stored.get(t)
        if r is None:
            continue
        same = (
            r["round"] == rnd
            and r["lr"] == p["lr"]
            and tuple(r["hidden"]) == p["hidden"]
            and r["bn"] == p["bn"]
        )
        if not same:
            raise UsageError(
                f"{csv_path}: trial {t} was written by a different search (other --seed, "
                "--trials, --rounds or ranges); resume with the same options or choose another --out"
            )


def best_config(base: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig options of the best trial, as `bnserve train --config` reads them."""
    config = TrainConfig(
        **{**base, "seed": best["seed"]},
        lr=best["lr"],
        beta1=best["beta1"],
        momentum=best["beta1"],
        weight_decay=best["weight_decay"],
        hidden=best["hidden"],
        batch_size=best["batch_size"],
        bn=best["bn"],
    ).to_json()
    config.pop("test", None)
    return config


def write_best(path: Path, base: dict[str, Any], best: dict[str, Any], space: SearchSpace) -> None:
    from bnserve.atomic import write_text_atomic

    doc = {
        "config": best_config(base, best),
        "trial": best["trial"],
        "round": best["round"],
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "test_accuracy": best.get("test_accuracy"),
        "search_space": space.to_json(),
    }
    write_text_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")
