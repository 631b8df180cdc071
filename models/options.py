"""The trainer's options, each declared once.

Name, type, default and allowed values come from `TrainConfig` (models/train.py) and the
registries it checks against (activations, BN placements, optimizers, schedules, dtypes); this
table adds only the help text. `bnserve train`, `tune` and `compare` build their parsers from it,
so an activation added to the registry is a valid `--activation` everywhere at once, and a
default changed in `TrainConfig` is the default every command uses and shows.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from bnserve.models.train import CHOICES, TrainConfig

HELP: dict[str, str] = {
    "hidden": "hidden layer widths",
    "activation": "hidden activation",
    "bn": "BN placement",
    "optimizer": "optimizer",
    "lr": "learning rate",
    "beta1": "Adam beta1",
    "beta2": "Adam / RMSprop beta2",
    "momentum": "Momentum optimizer coefficient",
    "weight_decay": "L2 on weights and biases, not gamma/beta",
    "lr_schedule": "learning-rate schedule",
    "lr_decay": "inverse: lr/(1+decay*epoch); exponential: lr*decay**epoch",
    "batch_size": "mini-batch size",
    "epochs": "maximum epochs",
    "dropout": "inverted dropout probability",
    "bn_momentum": "weight of the new batch in running stats",
    "bn_eps": "BN epsilon",
    "leaky_slope": "slope of leaky_relu below 0",
    "population_stats": "also compute exact population statistics and make them the default",
    "bagging": "train on a bootstrap sample of the training split (with --ensemble: each member "
    "its own sample)",
    "test": "separate held-out file in the same format",
    "test_split": "stratified held-out fraction",
    "val_split": "validation fraction of the rest",
    "patience": "early-stopping patience in epochs",
    "seed": "random seed",
    "dtype": "floating-point type of the training arithmetic",
    "label": "label column of a CSV (default the last)",
    "drop": "CSV columns to leave out, comma-separated (an unnamed column: --drop '')",
    "features": "the only CSV columns to use as features, comma-separated (default: all but the label)",
    "keep_id": "identifier-like CSV columns to keep as features on purpose, comma-separated",
    "categorical": "numeric CSV columns to treat as categories (e.g. small integer codes)",
    "missing_values": "cell texts that mean a missing value, comma-separated",
    "min_frequency": "training rows a category needs for its own one-hot column (rarer: other)",
}


def int_list(text: str) -> tuple[int, ...]:
    """`100,50` -> (100, 50): positive integers separated by commas."""
    try:
        values = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(w < 1 for w in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def text_list(text: str) -> tuple[str, ...]:
    """`a, b` -> ("a", "b"); `''` (an empty argument) -> ("",), e.g. a column without a name."""
    if text == "":
        return ("",)
    return tuple(part.strip() for part in text.split(","))


#: How a command-line value becomes the type of the option's default (str when it has none).
_PARSERS: dict[type, Any] = {tuple: text_list, int: int, float: float}
_PARSERS_BY_NAME: dict[str, Any] = {"hidden": int_list}


def default_of(name: str) -> Any:
    """`TrainConfig`'s default for option `name`."""
    for f in fields(TrainConfig):
        if f.name == name:
            return f.default if f.default is not MISSING else None
    raise KeyError(name)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def add_options(
    target: argparse.ArgumentParser | argparse._ActionsContainer,
    names: list[str] | tuple[str, ...],
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add the options `names` to a parser (or an argument group).

    `defaults` None: every option defaults to None, so that a `--config` file can fill what the
    command line omits (train). Otherwise each option defaults to `defaults[name]`, else to
    `TrainConfig`'s default (tune, compare). The help always shows the default in force."""
    for name in names:
        default = default_of(name)
        chosen = default if defaults is None else defaults.get(name, default)
        help_text = HELP[name]
        if chosen is not None and not isinstance(chosen, bool) and "(default" not in help_text:
            help_text += f" (default {_shown(chosen)})"
        kwargs: dict[str, Any] = {
            "default": None if defaults is None else chosen,
            "help": help_text,
            "dest": name,
        }
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _PARSERS_BY_NAME.get(name) or _PARSERS.get(type(default), str)
            if name in CHOICES:
                kwargs["choices"] = CHOICES[name]
        target.add_argument("--" + name.replace("_", "-"), **kwargs)
