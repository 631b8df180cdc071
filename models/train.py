"""The training loop: splits, standardization, mini-batches, early stopping, test-time statistics.

`train(config)` is the whole job as a function: it returns the checkpoint, the per-epoch history and
the final metrics; the CLI only parses options and writes files.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from bnserve.errors import DataError
from bnserve.models import layers
from bnserve.models.checkpoint import Checkpoint
from bnserve.models.data import Dataset, fingerprint, load_dataset, load_for_model, stratified_split
from bnserve.models.network import (
    PLACEMENTS,
    NetworkSpec,
    Params,
    hidden_forward_eval,
    init_params,
    logits_eval,
    loss_and_grads,
)
from bnserve.models.optim import OPTIMIZERS, SCHEDULES, make_optimizer, scheduled_lr
from bnserve.models.profile import profile_of_features, profile_of_table
from bnserve.models.tabular import DEFAULT_MIN_FREQUENCY, DEFAULT_MISSING, ColumnOptions

DTYPES = {"float64": np.float64, "float32": np.float32}

CHOICES: dict[str, tuple[str, ...]] = {
    "activation": layers.ACTIVATIONS,
    "bn": PLACEMENTS,
    "optimizer": OPTIMIZERS,
    "lr_schedule": SCHEDULES,
    "dtype": tuple(DTYPES),
}
_STRING_LISTS = ("drop", "features", "keep_id", "categorical", "missing_values")
_FLOATS = (
    "lr", "beta1", "beta2", "momentum", "weight_decay", "lr_decay", "dropout", "bn_momentum",
    "bn_eps", "leaky_slope", "test_split", "val_split",
)  # fmt: skip


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _integer(name: str, value: Any) -> int:
    """An int option; JSON's 64.0 is accepted, 64.5, "64" and true are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"--{_flag(name)} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise ValueError(f"--{_flag(name)} must be an integer, got {value!r}")
    return int(value)


def _real(name: str, value: Any) -> float:
    """A finite float option (NaN would pass every range check below by comparing False)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"--{_flag(name)} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class TrainConfig:
    """Every option of `bnserve train` (a `--config` JSON file holds the same keys)."""

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    bn: str = "before"
    optimizer: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    lr_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 50
    dropout: float = 0.0
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    leaky_slope: float = 0.01
    population_stats: bool = False
    # Train on a bootstrap sample of the training split (rows drawn with replacement, as many as
    # the split has): the bagging of `train --ensemble`.
    bagging: bool = False
    test: str | None = None
    test_split: float = 0.2
    val_split: float = 0.1
    patience: int = 10
    seed: int = 0
    split_seed: int | None = None  # seeds the data split alone (tune: same split, other seeds)
    dtype: str = "float64"
    label: str | None = None
    # Raw tabular data (models/tabular.py): which columns, and how cells are read.
    drop: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    keep_id: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = DEFAULT_MISSING
    min_frequency: int = DEFAULT_MIN_FREQUENCY

    def __post_init__(self) -> None:
        # A --config file is JSON: every value is checked here (type and range), so a bad one is
        # a usage error naming the option, never a traceback from deep inside the training loop.
        if isinstance(self.hidden, str) or not isinstance(self.hidden, list | tuple):
            raise ValueError(f"--hidden must be a list of layer widths, got {self.hidden!r}")
        self.hidden = tuple(_integer("hidden", w) for w in self.hidden)
        if any(w < 1 for w in self.hidden):
            raise ValueError(f"--hidden widths must be >= 1, got {list(self.hidden)}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"--{_flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        for name in _STRING_LISTS:
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ValueError(f"--{_flag(name)} must be a list of column names, got {value!r}")
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"--{_flag(name)} must be a list of strings, got {value!r}")
            setattr(self, name, tuple(value))
        for name in ("batch_size", "epochs", "patience", "seed", "min_frequency"):
            setattr(self, name, _integer(name, getattr(self, name)))
        if self.split_seed is not None:
            self.split_seed = _integer("split_seed", self.split_seed)
        for name in _FLOATS:
            setattr(self, name, _real(name, getattr(self, name)))
        for name in ("population_stats", "bagging"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("test", "label"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"--{_flag(name)} must be a string, got {value!r}")
        if not 0 <= self.test_split < 1 or not 0 <= self.val_split < 1:
            raise ValueError("--test-split and --val-split must be fractions in [0, 1)")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2 (BN needs two examples per batch)")
        if self.epochs < 1 or self.patience < 1:
            raise ValueError("--epochs and --patience must be at least 1")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        # beta = 1 would never move the averages (and divides by zero in Adam's bias correction).
        for name in ("beta1", "beta2", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.lr_decay < 0 or (self.lr_schedule == "exponential" and self.lr_decay > 1):
            raise ValueError(
                f"--lr-decay must be >= 0 (inverse) or in [0, 1] (exponential), got {self.lr_decay}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"--bn-momentum must be in (0, 1], got {self.bn_momentum}")
        if self.bn_eps <= 0:
            raise ValueError(f"--bn-eps must be positive, got {self.bn_eps}")
        if self.min_frequency < 1:
            raise ValueError(f"--min-frequency must be at least 1, got {self.min_frequency}")

    def column_options(self) -> ColumnOptions:
        """How a CSV's columns are chosen and read (models/tabular.py)."""
        return ColumnOptions(
            self.drop,
            self.features,
            self.keep_id,
            self.categorical,
            self.missing_values,
            self.min_frequency,
        )

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("hidden", *_STRING_LISTS):
            d[name] = list(getattr(self, name))
        return d


@dataclass
class Splits:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray | None
    y_test: np.ndarray | None
    profile: dict[str, Any] = field(default_factory=dict)  # the training rows' inputs


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


# The random streams spawned from a run's seed, in this order (a stream's values do not depend on
# how many are spawned after it, so adding one changed none of the others).
STREAMS = ("split", "init", "shuffle", "dropout", "bootstrap")


def split_generator(seed: int, split_seed: int | None = None) -> np.random.Generator:
    """The generator that cuts the data (test part, then validation): the first of the streams
    spawned from `split_seed` when given, else from `seed` (the others initialize, shuffle, drop
    out and, with bagging, draw the bootstrap sample)."""
    root = seed if split_seed is None else split_seed
    return np.random.default_rng(np.random.SeedSequence(root).spawn(len(STREAMS))[0])


def bootstrap(splits: Splits, rng: np.random.Generator) -> tuple[Splits, dict[str, Any]]:
    """`splits` with its training rows replaced by a bootstrap sample of them (as many rows, drawn
    with replacement), and what was drawn: the distinct rows and a sha256 of the drawn indices."""
    n = len(splits.y_train)
    drawn = np.sort(rng.integers(0, n, size=n))
    digest = hashlib.sha256(drawn.astype("<i8").tobytes()).hexdigest()
    sample = replace(splits, X_train=splits.X_train[drawn], y_train=splits.y_train[drawn])
    return sample, {"n_train_distinct": len(np.unique(drawn)), "train_rows_sha256": digest}


def network_spec(config: TrainConfig, n_features: int, n_classes: int) -> NetworkSpec:
    """The network `config` describes, for data with `n_features` and `n_classes`."""
    return NetworkSpec(
        n_features=n_features,
        n_classes=n_classes,
        hidden=config.hidden,
        activation=config.activation,
        bn=config.bn,
        dropout=config.dropout,
        leaky_slope=config.leaky_slope,
        bn_eps=config.bn_eps,
        bn_momentum=config.bn_momentum,
    )


@dataclass
class EarlyStopping:
    """The best validation epoch so far and its weights; stops after `patience` worse epochs."""

    patience: int
    best_loss: float = math.inf
    best_epoch: int = 0
    best_params: Params | None = None
    stale: int = 0

    def keep(self, epoch: int, params: Params) -> None:
        self.best_epoch, self.best_params = epoch + 1, {k: v.copy() for k, v in params.items()}

    def stop(self, epoch: int, val_loss: float, params: Params) -> bool:
        """Record epoch `epoch` (0-based); True when training should stop."""
        if val_loss < self.best_loss:
            self.best_loss, self.stale = val_loss, 0
            self.keep(epoch, params)
            return False
        self.stale += 1
        return self.stale >= self.patience


def split_data(data: Dataset, config: TrainConfig, rng: np.random.Generator) -> Splits:
    """Test part (a separate file or a stratified fraction), then validation from the rest. A raw
    table's preprocessing is fitted on the training rows only, then every row is encoded."""
    y = data.y
    rows = np.arange(len(y))
    test_rows = None
    if not config.test and config.test_split > 0:
        rest, test_rows = stratified_split(y, config.test_split, rng)
        rows = rows[rest]
    rest, val = stratified_split(y[rows], config.val_split, rng)
    train_rows, val_rows = rows[rest], rows[val]
    data.encode(train_rows)
    X = data.X
    assert X is not None
    if config.test:
        # Columns are matched by name, as `evaluate` does: the same columns in another order are
        # the same test set, not an error.
        X_test, y_test = load_for_model(
            config.test, data.feature_names, data.class_names, config.label, data.preprocessor
        )
    elif test_rows is not None:
        X_test, y_test = X[test_rows], y[test_rows]
    else:
        X_test = y_test = None
    if data.table is not None and data.preprocessor is not None:
        profile = profile_of_table(data.table, train_rows, data.preprocessor)
    else:
        profile = profile_of_features(X[train_rows], data.feature_names)
    return Splits(X[train_rows], y[train_rows], X[val_rows], y[val_rows], X_test, y_test, profile)


@dataclass
class EvaluationRows:
    """Which rows of a data set `evaluate` scores, and a line that says which and why."""

    rows: np.ndarray  # indices into the data set
    split: str  # "test": the part `train` held out; "all": every row
    note: str


def evaluation_rows(
    ckpt: Checkpoint, X: np.ndarray, y: np.ndarray, all_rows: bool = False
) -> EvaluationRows:
    """The test part `train` held out of this data set, cut again the way `split_data` cut it
    (same fraction, same seed, same stratification), when the data set is the one the checkpoint
    was trained on (its fingerprint matches) and a part of it was held out; otherwise (or with
    `all_rows`) every row, with the reason. `X` and `y` are in the model's column and class
    order, as `load_for_model` returns them."""
    n = len(y)

    def every(why: str) -> EvaluationRows:
        return EvaluationRows(np.arange(n), "all", f"all {n} rows: {why}")

    if all_rows:
        return every("--all-rows")
    if not ckpt.data_fingerprint:
        return every("the checkpoint records no fingerprint of its training data")
    if fingerprint(X, y, ckpt.class_names) != ckpt.data_fingerprint:
        return every("not the data the model was trained on (the fingerprints differ)")
    try:
        names = set(TrainConfig.option_names())
        config = TrainConfig(**{k: v for k, v in ckpt.config.items() if k in names})
    except (TypeError, ValueError):
        return every("the checkpoint does not record how its training data was split")
    if config.test:
        return every(
            f"the model was tested on a separate file ({config.test}) and trained on this one, "
            "so these rows include its training rows"
        )
    if config.test_split == 0:
        return every(
            "the model was trained with --test-split 0 (nothing held out), "
            "so these rows include its training rows"
        )
    if ckpt.config.get("stream"):  # `train --stream` held out rows by a hash of their values
        from bnserve.models.stream import TEST, row_split

        held = np.flatnonzero(row_split(X, config.test_split, config.val_split) == TEST)
        return EvaluationRows(
            held,
            "test",
            f"held-out split: {len(held)} of {n} rows (the rows train --stream held out by "
            f"their hash: --test-split {config.test_split:g})",
        )
    seed = config.seed if config.split_seed is None else config.split_seed
    _, held = stratified_split(y, config.test_split, split_generator(seed))
    if len(held) == 0:
        return every("no class has the two examples a held-out part needs")
    recorded = ckpt.metrics.get("n_test")
    if isinstance(recorded, int) and recorded != len(held):
        return every(
            f"the held-out split does not reproduce ({len(held)} rows here, {recorded} in "
            "training), so these rows include training rows"
        )
    return EvaluationRows(
        held,
        "test",
        f"held-out split: {len(held)} of {n} rows "
        f"(the test part train held out: --test-split {config.test_split:g}, seed {seed})",
    )


def standardization(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training data; a constant feature gets std 1."""
    mean = X.mean(axis=0)
    return mean, usable_std(mean, X.std(axis=0))


def usable_std(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """`std` with 1 for a constant feature (std at rounding level of its mean), in place."""
    std[std <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    return std


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A fresh permutation cut into batches; a final batch of one example joins the previous one
    (BN in training mode is undefined for one example)."""
    order = rng.permutation(n)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


def evaluate(
    spec: NetworkSpec, params: Params, X: np.ndarray, y: np.ndarray, stats: str = "running"
) -> tuple[float, float]:
    """Inference-mode `(loss, accuracy)` on raw features."""
    if len(y) == 0:
        return math.nan, math.nan
    logits = logits_eval(spec, params, X, stats)
    logp = layers.log_softmax(logits)
    # 0.0 - x, not -x: a perfectly confident model's loss is 0.0, never -0.0
    loss = 0.0 - float(logp[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def bn_input(spec: NetworkSpec, params: Params, a: np.ndarray, i: int) -> np.ndarray:
    """What hidden layer `i`'s BN normalizes, given the layer's input `a`: the linear output
    (BN before the activation) or the activation (after)."""
    p = f"hidden.{i}."
    z, _ = layers.linear_forward(a, params[p + "W"], params.get(p + "b"))
    if spec.bn == "before":
        return z
    return layers.activation_eval(z, spec.activation, spec.leaky_slope)


def population_statistics(spec: NetworkSpec, params: Params, X_std: np.ndarray) -> Params:
    """Exact mean and (biased) variance of each BN layer's input over the whole training set,
    layer by layer, with the layers before it in inference mode using the population statistics
    already computed. Returns the `hidden.{i}.population_*` arrays."""
    out: Params = {}
    work = dict(params)
    a = X_std
    for i in range(len(spec.hidden)):
        p = f"hidden.{i}."
        inputs = bn_input(spec, params, a, i)
        out[p + "population_mean"] = inputs.mean(axis=0)
        out[p + "population_var"] = inputs.var(axis=0)
        work.update({k: v for k, v in out.items() if k.startswith(p)})
        a = hidden_forward_eval(spec, work, a, i, "population")
    return out


def diverging(train_loss: float, n_classes: int, params: Params) -> bool:
    """A loss that is not finite, or 100 times that of guessing (log C): the learning rate is too
    high and the weights are running away."""
    if not math.isfinite(train_loss) or train_loss > 100 * math.log(n_classes):
        return True
    return not all(np.isfinite(v).all() for v in params.values())


def train(
    config: TrainConfig,
    data: Dataset | str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a network on `data` (a Dataset or a source string) and return its checkpoint."""
    started = time.perf_counter()
    if isinstance(data, str):
        data = load_dataset(data, config.label, config.column_options(), DTYPES[config.dtype])
    dtype = DTYPES[config.dtype]
    seeds = np.random.SeedSequence(config.seed).spawn(len(STREAMS))
    init_rng, shuffle_rng, dropout_rng, bootstrap_rng = (
        np.random.default_rng(s) for s in seeds[1:]
    )
    splits = split_data(data, config, split_generator(config.seed, config.split_seed))
    drawn: dict[str, Any] = {}
    if config.bagging:
        splits, drawn = bootstrap(splits, bootstrap_rng)
    n = len(splits.y_train)
    if n < 2:
        raise DataError(f"{data.source}: {n} training example(s) left after the splits; need >= 2")

    spec = network_spec(config, data.n_features, len(data.class_names))
    params = init_params(spec, init_rng, dtype)
    mean, std = standardization(splits.X_train)
    params["input.mean"], params["input.std"] = mean, std
    X_train = ((splits.X_train - mean) / std).astype(dtype)
    initial = {k: v.copy() for k, v in params.items()}
    optimizer = make_optimizer(
        config.optimizer, config.beta1, config.beta2, config.momentum, config.weight_decay
    )
    has_val = len(splits.y_val) > 0
    stopping = EarlyStopping(config.patience)
    history: list[dict[str, float]] = []
    diverged = False

    # A too-large learning rate overflows before the loss turns non-finite; that is detected and
    # reported below (diverged), so numpy's overflow warnings would only be noise.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            lr = scheduled_lr(config.lr, epoch, config.lr_schedule, config.lr_decay)
            loss_sum = correct = 0.0
            for batch in minibatches(n, config.batch_size, shuffle_rng):
                loss, grads, logits = loss_and_grads(
                    spec, params, X_train[batch], splits.y_train[batch], dropout_rng
                )
                optimizer.step(params, grads, lr)
                loss_sum += loss * len(batch)
                correct += float((logits.argmax(axis=1) == splits.y_train[batch]).sum())
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum / n,
                "train_accuracy": correct / n,
            }
            val_loss, val_acc = evaluate(spec, params, splits.X_val, splits.y_val)
            row.update(val_loss=val_loss, val_accuracy=val_acc, seconds=time.perf_counter() - t0)
            history.append(row)
            if on_epoch:
                on_epoch(row)
            if diverging(row["train_loss"], spec.n_classes, params):
                diverged = True  # keep the best weights seen so far; never save NaNs
                break
            if has_val:
                if stopping.stop(epoch, val_loss, params):
                    break
            elif config.epochs > 1:
                # Without validation the last finite epoch is the best known: a later divergence must
                # fall back to it, not throw every epoch away (one copy per epoch, small next to it).
                stopping.keep(epoch, params)
    best_epoch = stopping.best_epoch
    if stopping.best_params is not None:
        params = stopping.best_params
    elif diverged:
        params = initial  # nothing usable was learnt; callers check metrics["best_epoch"] == 0
        best_epoch = 0
    else:
        best_epoch = len(history)

    stats_default = "running"
    if config.population_stats and spec.has_bn:
        params.update(population_statistics(spec, params, X_train))
        stats_default = "population"

    metrics = _final_metrics(spec, params, splits, stats_default)
    metrics.update(
        epochs=len(history),
        best_epoch=best_epoch,
        diverged=diverged,
        stats=stats_default,
        seconds=round(time.perf_counter() - started, 3),
        n_train=n,
        n_val=len(splits.y_val),
        n_test=0 if splits.y_test is None else len(splits.y_test),
        **drawn,
    )
    checkpoint = Checkpoint(
        spec=spec,
        params=params,
        class_names=data.class_names,
        feature_names=data.feature_names,
        stats_default=stats_default,
        config=config.to_json() | {"data": data.source},
        data_fingerprint=fingerprint(data.X, data.y, data.class_names),
        metrics=metrics,
        preprocessor=data.preprocessor,
        profile=splits.profile,
    )
    return TrainResult(checkpoint, history, metrics)


def _final_metrics(
    spec: NetworkSpec, params: Params, splits: Splits, stats: str
) -> dict[str, float | None]:
    def pair(X: np.ndarray | None, y: np.ndarray | None) -> tuple[float | None, float | None]:
        if y is None or len(y) == 0:
            return None, None
        return evaluate(spec, params, X, y, stats)

    train_loss, train_acc = pair(splits.X_train, splits.y_train)
    val_loss, val_acc = pair(splits.X_val, splits.y_val)
    test_loss, test_acc = pair(splits.X_test, splits.y_test)
    return {
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
    }
