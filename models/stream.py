"""Out-of-core training (`bnserve train --stream`): data sets larger than memory, read in chunks.

The file is never held at once. One streaming pass first finds the classes, counts the rows,
computes the standardization of the training rows (Chan's parallel update of mean and variance,
chunk by chunk) and their training profile (models/profile.py, from a hash-chosen sample). Rows are assigned to train / validation / test by a stable hash of their
feature values (`row_split`), so the split is reproducible without holding the data, independent
of the row order, and duplicated rows never straddle two parts. Each epoch streams the file
again and draws mini-batches from a shuffle buffer of several chunks; validation loss and
accuracy take one more streaming pass with the epoch's weights. `--population-stats` computes
each BN layer's exact statistics with one streaming pass per layer. Memory: about
`buffer_chunks x chunk_rows x F` floats for the shuffle buffer, one chunk being read, the
model, the profile's sample (`profile.SAMPLE_ROWS x F` float64) and 4 bytes per row for the
labels (the fingerprint). The checkpoint has the same format
as `bnserve train`'s.

Streaming needs every feature column to be a number (no categories or missing cells: those need
the whole training split to fit, models/tabular.py).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from bnserve.errors import DataError
from bnserve.models import reading
from bnserve.models.checkpoint import Checkpoint
from bnserve.models.data import canonical_labels, class_order
from bnserve.models.network import (
    NetworkSpec,
    Params,
    hidden_forward_eval,
    init_params,
    loss_and_grads,
)
from bnserve.models.optim import make_optimizer, scheduled_lr
from bnserve.models.profile import StreamingProfile
from bnserve.models.reading import fill_floats, header_line, read_header
from bnserve.models.train import (
    DTYPES,
    EarlyStopping,
    TrainConfig,
    TrainResult,
    bn_input,
    diverging,
    evaluate,
    network_spec,
    usable_std,
)

TRAIN, VAL, TEST = 0, 1, 2
DEFAULT_CHUNK_ROWS = 65536
BUFFER_CHUNKS = 4


def row_hash(X: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per row from its feature values (as float32, so a float64 and a
    float32 reading of the same file agree): splitmix64 over the values' bits, column by column."""
    bits = np.ascontiguousarray(X, dtype=np.float32).view(np.uint32).astype(np.uint64)
    h = np.full(len(X), 0x9E3779B97F4A7C15, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(bits.shape[1]):
            z = h ^ bits[:, j]
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = z ^ (z >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_split(X: np.ndarray, test_split: float, val_split: float) -> np.ndarray:
    """TRAIN, VAL or TEST per row: test below `test_split`, validation the next `val_split` of
    the rest, by the row's hash."""
    return split_of(row_hash(X), test_split, val_split)


def split_of(h: np.ndarray, test_split: float, val_split: float) -> np.ndarray:
    """row_split from the rows' hashes."""
    codes = np.full(len(h), TRAIN, dtype=np.int8)
    codes[h < test_split + (1.0 - test_split) * val_split] = VAL
    codes[h < test_split] = TEST
    return codes


@dataclass
class Source:
    """A CSV or Parquet file read chunk by chunk: features as `dtype`, the label as text."""

    path: Path
    label: str
    features: list[str]
    dtype: np.dtype
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def chunks(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        if self.path.suffix.lower() == ".parquet":
            yield from self._parquet()
        else:
            yield from self._csv()

    def _csv(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        header = read_header(self.path)
        skip = header_line(self.path) + 1
        read = pacsv.ReadOptions(
            column_names=header, skip_rows=skip, block_size=reading.BLOCK_BYTES
        )
        # a quoted cell may hold a line break: pyarrow must not cut its blocks there (no cost
        # measured on a file without quotes)
        parse = pacsv.ParseOptions(newlines_in_values=True)
        types = {name: pa.float64() for name in self.features}
        convert = pacsv.ConvertOptions(
            column_types={**types, self.label: pa.string()},
            include_columns=[*self.features, self.label],
        )
        try:
            batches = pacsv.open_csv(
                self.path, read_options=read, parse_options=parse, convert_options=convert
            )
            for batch in batches:
                yield self._arrays(batch)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(
                f"{self.path}: --stream reads numeric feature columns only "
                f"({str(exc).splitlines()[0]})"
            ) from None

    def _parquet(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        import pyarrow.parquet as pq

        source = pq.ParquetFile(self.path)
        columns = [*self.features, self.label]
        for batch in source.iter_batches(batch_size=self.chunk_rows, columns=columns):
            yield self._arrays(batch)

    def _arrays(self, batch: pa.RecordBatch) -> tuple[np.ndarray, list[str]]:
        X = np.empty((batch.num_rows, len(self.features)), dtype=self.dtype)
        for j in range(len(self.features)):
            column = batch.column(j)
            numeric = pa.types.is_floating(column.type) or pa.types.is_integer(column.type)
            if column.null_count or not numeric:
                raise DataError(
                    f"{self.path}: column {self.features[j]!r} has missing or non-numeric "
                    "cells; --stream reads complete numeric feature columns only"
                )
            fill_floats(X[:, j], column)
        if not np.isfinite(X).all():
            j = int(np.argwhere(~np.isfinite(X))[0][1])
            raise DataError(f"{self.path}: column {self.features[j]!r} holds a non-finite value")
        labels = batch.column(len(self.features)).cast(pa.string()).to_pylist()
        return X, ["" if v is None else v.strip() for v in labels]


def open_source(path: str, config: TrainConfig, chunk_rows: int) -> Source:
    """The file's label and feature columns, chosen as `bnserve train` chooses them."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file (--stream reads a .csv or .parquet file)")
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        header = [str(n) for n in pq.ParquetFile(p).schema_arrow.names]
    else:
        header = read_header(p)
    label = config.label or header[-1]
    if label not in header:
        raise DataError(f"{path}: label column {label!r} not found; columns are: {header}")
    features = list(config.features) or [h for h in header if h != label]
    features = [f for f in features if f not in config.drop]
    unnamed = [f for f in features if f == "" or f.lower().startswith("unnamed:")]
    if unnamed and not set(unnamed) <= set(config.keep_id):
        raise DataError(
            f"{path}: a column without a name (a written-out index) would let the model learn "
            "the row order; drop it (--drop '') or keep it (--keep-id '')"
        )
    return Source(p, label, features, np.dtype(DTYPES[config.dtype]), chunk_rows)


class Moments:
    """Per-feature count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)

    def add(self, X: np.ndarray) -> None:
        if len(X) == 0:
            return
        X = X.astype(np.float64, copy=False)
        n_b, mean_b = len(X), X.mean(axis=0)
        m2_b = ((X - mean_b) ** 2).sum(axis=0)
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / total)
        self.n = total

    def variance(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)


@dataclass
class Scan:
    """What the first pass learns: classes, split sizes, standardization, fingerprint."""

    class_names: list[str]
    counts: dict[int, int]
    mean: np.ndarray
    std: np.ndarray
    fingerprint: str
    index: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)  # the training rows' (models/profile.py)


def scan(source: Source, config: TrainConfig) -> Scan:
    moments = Moments(len(source.features))
    profile = StreamingProfile(source.features)
    counts = {TRAIN: 0, VAL: 0, TEST: 0}
    hash_x = hashlib.sha256()
    seen: dict[str, int] = {}
    codes: list[np.ndarray] = []
    for X, labels in source.chunks():
        bad = [i for i, t in enumerate(labels) if not t or t.lower() == "nan"]
        if bad:
            raise DataError(f"{source.path}: missing label in column {source.label!r}")
        h = row_hash(X)
        split = split_of(h, 0.0 if config.test else config.test_split, config.val_split)
        train = split == TRAIN
        moments.add(X[train])
        profile.add(X[train], h[train])  # the training rows' hashes are uniform above the cut
        for part in counts:
            counts[part] += int((split == part).sum())
        hash_x.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
        codes.append(np.array([seen.setdefault(t, len(seen)) for t in labels], dtype=np.int32))
    if counts[TRAIN] < 2:
        raise DataError(f"{source.path}: {counts[TRAIN]} training rows; need at least 2")
    texts = list(seen)
    names_by_text = dict(zip(texts, canonical_labels(texts), strict=True))
    class_names = class_order(set(names_by_text.values()))
    if len(class_names) < 2:
        raise DataError(f"{source.path}: only one class; need at least two")
    index = {t: class_names.index(names_by_text[t]) for t in texts}
    remap = np.array([index[t] for t in texts], dtype=np.int64)
    y_all = remap[np.concatenate(codes)]
    hash_x.update(y_all.tobytes())
    hash_x.update("\x1f".join(class_names).encode())
    std = usable_std(moments.mean, np.sqrt(moments.variance()))
    return Scan(
        class_names,
        counts,
        moments.mean,
        std,
        hash_x.hexdigest(),
        index,
        profile.result(moments.variance()),
    )


def _batches(
    source: Source,
    info: Scan,
    config: TrainConfig,
    part: int,
    rng: np.random.Generator | None,
    standardize: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of one part (standardized, or raw for `logits_eval`, which standardizes itself),
    with their class indices: shuffled through a buffer of BUFFER_CHUNKS chunks when `rng` is
    given (training), in file order otherwise."""
    test_split = 0.0 if config.test else config.test_split
    buffer_X: list[np.ndarray] = []
    buffer_y: list[np.ndarray] = []
    held = 0
    for X, labels in source.chunks():
        keep = row_split(X, test_split, config.val_split) == part
        if not keep.any():
            continue
        y = np.array([info.index[t] for t, k in zip(labels, keep, strict=True) if k])
        buffer_X.append((X[keep] - info.mean) / info.std if standardize else X[keep])
        buffer_y.append(y)
        held += len(y)
        if rng is None or held >= BUFFER_CHUNKS * source.chunk_rows:
            yield from _drain(buffer_X, buffer_y, rng)
            buffer_X, buffer_y, held = [], [], 0
    if buffer_X:
        yield from _drain(buffer_X, buffer_y, rng)


def _drain(
    buffer_X: list[np.ndarray], buffer_y: list[np.ndarray], rng: np.random.Generator | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    X, y = np.concatenate(buffer_X), np.concatenate(buffer_y)
    if rng is not None:
        order = rng.permutation(len(y))
        X, y = X[order], y[order]
    yield X, y


def _loss_accuracy(
    spec: NetworkSpec, params: Params, source: Source, info: Scan, config: TrainConfig, part: int,
    stats: str = "running",
) -> tuple[float | None, float | None]:  # fmt: skip
    total = loss = correct = 0.0
    for X, y in _batches(source, info, config, part, None, standardize=False):
        batch_loss, batch_accuracy = evaluate(spec, params, X, y, stats)  # the trainer's measure
        loss += batch_loss * len(y)
        correct += batch_accuracy * len(y)
        total += len(y)
    if total == 0:
        return None, None
    return loss / total, correct / total


def train_stream(
    config: TrainConfig,
    path: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """`train` for files larger than memory (see the module docstring)."""
    if config.test:
        raise DataError("--stream holds out its test rows by hash; use --test-split, not --test")
    if config.bagging:
        raise DataError("--stream reads every training row once per epoch; it has no --bagging")
    started = time.perf_counter()
    source = open_source(path, config, chunk_rows)
    info = scan(source, config)
    dtype = DTYPES[config.dtype]
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    _, init_rng, shuffle_rng, dropout_rng = (np.random.default_rng(s) for s in seeds)
    spec = network_spec(config, len(source.features), len(info.class_names))
    params = init_params(spec, init_rng, dtype)
    params["input.mean"], params["input.std"] = info.mean, info.std
    optimizer = make_optimizer(
        config.optimizer, config.beta1, config.beta2, config.momentum, config.weight_decay
    )
    history: list[dict[str, float]] = []
    stopping, diverged = EarlyStopping(config.patience), False
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            lr = scheduled_lr(config.lr, epoch, config.lr_schedule, config.lr_decay)
            seen = loss_sum = correct = 0.0
            for X, y in _batches(source, info, config, TRAIN, shuffle_rng):
                X = X.astype(dtype)
                for start in range(0, len(y) - 1, config.batch_size):
                    stop = start + config.batch_size
                    if len(y) - stop == 1:  # BN needs two examples: the last one joins
                        stop += 1
                    xb, yb = X[start:stop], y[start:stop]
                    loss, grads, logits = loss_and_grads(spec, params, xb, yb, dropout_rng)
                    optimizer.step(params, grads, lr)
                    loss_sum += loss * len(yb)
                    correct += float((logits.argmax(axis=1) == yb).sum())
                    seen += len(yb)
            val_loss, val_acc = _loss_accuracy(spec, params, source, info, config, VAL)
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "val_loss": math.nan if val_loss is None else val_loss,
                "val_accuracy": math.nan if val_acc is None else val_acc,
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            if on_epoch:
                on_epoch(row)
            if diverging(row["train_loss"], spec.n_classes, params):
                diverged = True
                break
            if val_loss is not None and stopping.stop(epoch, val_loss, params):
                break
    best_epoch = stopping.best_epoch
    if stopping.best_params is not None:
        params = stopping.best_params
    else:
        best_epoch = 0 if diverged else len(history)
    stats_default = "running"
    if config.population_stats and spec.has_bn:
        params.update(population_statistics_stream(spec, params, source, info, config))
        stats_default = "population"
    metrics: dict[str, object] = {}
    for part, name in ((TRAIN, "train"), (VAL, "val"), (TEST, "test")):
        loss, acc = _loss_accuracy(spec, params, source, info, config, part, stats_default)
        metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = loss, acc
    metrics.update(
        epochs=len(history),
        best_epoch=best_epoch,
        diverged=diverged,
        stats=stats_default,
        seconds=round(time.perf_counter() - started, 3),
        n_train=info.counts[TRAIN],
        n_val=info.counts[VAL],
        n_test=info.counts[TEST],
        stream={"chunk_rows": chunk_rows, "buffer_chunks": BUFFER_CHUNKS},
    )
    checkpoint = Checkpoint(
        spec=spec,
        params=params,
        class_names=info.class_names,
        feature_names=source.features,
        stats_default=stats_default,
        config=config.to_json() | {"data": path, "stream": True},
        data_fingerprint=info.fingerprint,
        metrics=metrics,
        profile=info.profile,
    )
    return TrainResult(checkpoint, history, metrics)


def population_statistics_stream(
    spec: NetworkSpec, params: Params, source: Source, info: Scan, config: TrainConfig
) -> Params:
    """Each BN layer's exact mean and (biased) variance over the training rows: one streaming
    pass per layer, the layers before it in inference mode with their population statistics."""
    out: Params = {}
    work = dict(params)
    for i in range(len(spec.hidden)):
        p = f"hidden.{i}."
        moments = Moments(spec.hidden[i])
        for X, _ in _batches(source, info, config, TRAIN, None):
            a = X
            for j in range(i):
                a = hidden_forward_eval(spec, work, a, j, "population")
            moments.add(bn_input(spec, params, a, i))
        out[p + "population_mean"] = moments.mean
        out[p + "population_var"] = moments.variance()
        work.update({k: v for k, v in out.items() if k.startswith(p)})
    return out
