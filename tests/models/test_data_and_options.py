"""Odd data files and bad option values through the `bnserve` dispatcher (in process, so a stray
exception fails the test instead of hiding in a subprocess' stderr): each is either read the way
a user means it or refused with exit code 2 and a message, never a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bnserve.cli import main
from bnserve.models.checkpoint import load_checkpoint
from bnserve.models.data import load_dataset
from bnserve.models.tune import CSV_FIELDS, SearchSpace, _csv_row, read_trials, search

FAST = ["--epochs", "1", "--hidden", "4", "--quiet"]


def csv_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def train(tmp_path: Path, data: str, *extra: str) -> int:
    return main(["train", data, "--out", str(tmp_path / "out"), *FAST, *extra])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--bn-momentum", "0"], "--bn-momentum must be in (0, 1]"),
        (["--bn-eps", "0"], "--bn-eps must be positive"),
        (["--beta1", "1"], "--beta1 must be in [0, 1)"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--lr-schedule", "inverse", "--lr-decay", "-1"], "--lr-decay must be >= 0"),
        (["--lr-schedule", "exponential", "--lr-decay", "2"], "--lr-decay must be"),
        (["--lr", "nan"], "--lr must be a finite number"),
    ],
)
def test_out_of_range_options_are_usage_errors(tmp_path, capsys, options, message):
    assert train(tmp_path, "sklearn:iris", *options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"epochs": 2.5}, "--epochs must be an integer"),
        ({"activation": "gelu"}, "--activation must be one of"),
        ({"optimizer": "lbfgs"}, "--optimizer must be one of"),
        ({"lr_schedule": "cosine"}, "--lr-schedule must be one of"),
        ({"population_stats": "no"}, "population_stats must be true or false"),
        ({"lr": "0.1"}, "--lr must be a finite number"),
        ({"hidden": "100,100"}, "--hidden must be a list"),
    ],
)
def test_bad_config_file_values_are_usage_errors(tmp_path, capsys, config, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 1, **config}))
    out = str(tmp_path / "out")
    assert main(["train", "sklearn:iris", "--out", out, "--config", str(path), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_command_line_test_split_beats_the_config_files_test(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"test": str(tmp_path / "missing.csv")}))
    assert train(tmp_path, "sklearn:iris", "--config", str(path), "--test-split", "0.3") == 0


def test_missing_label_is_refused_with_row_and_column(tmp_path, capsys):
    data = csv_file(tmp_path / "d.csv", "a,b,y\n1,2,x\n2,3,\n3,4,z\n4,5,x\n")
    assert train(tmp_path, data) == 2
    assert "row 3, column 'y': missing label" in capsys.readouterr().err


def test_numeric_labels_are_one_class_per_value(tmp_path):
    rows = "".join(f"{i},{i % 5},{['1', '1.0', '2', '2.0'][i % 4]}\n" for i in range(24))
    data = csv_file(tmp_path / "d.csv", "a,b,y\n" + rows)
    assert load_dataset(data).class_names == ["1", "2"]
    # a test file (and evaluate) matches numeric classes by value as well
    test = csv_file(tmp_path / "t.csv", "b,a,y\n1,1,1.00\n2,2,2\n")  # and columns by name
    assert train(tmp_path, data, "--test", test) == 0
    assert main(["evaluate", str(tmp_path / "out" / "checkpoint.npz"), test]) == 0


def test_npz_byte_labels_nan_labels_complex_x_and_duplicate_names(tmp_path, capsys):
    X = np.random.default_rng(0).normal(size=(12, 2))
    np.savez(tmp_path / "bytes.npz", X=X, y=np.array([b"cat", b"dog"] * 6))
    assert load_dataset(str(tmp_path / "bytes.npz")).class_names == ["cat", "dog"]
    for name, arrays, message in [
        ("nan_y", {"X": X, "y": np.array([0.0, math.nan] * 6)}, "y[1] is nan"),
        ("complex", {"X": X + 1j, "y": np.arange(12) % 2}, "not real numeric"),
        (
            "dup",
            {"X": X, "y": np.arange(12) % 2, "feature_names": np.array(["a", "a"])},
            "duplicate names",
        ),
    ]:
        np.savez(tmp_path / f"{name}.npz", **arrays)
        assert train(tmp_path, str(tmp_path / f"{name}.npz")) == 2, name
        assert message in capsys.readouterr().err


def test_output_folder_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["train", "sklearn:iris", "--out", str(tmp_path / "afile" / "run"), *FAST]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert train(tmp_path, "sklearn:iris") == 0
    ckpt = str(tmp_path / "out" / "checkpoint.npz")
    plot = str(tmp_path / "afile" / "cm.png")
    assert main(["evaluate", ckpt, "sklearn:iris", "--plot", plot]) == 2
    assert "afile: is a file" in capsys.readouterr().err


def test_tune_and_compare_refuse_what_they_cannot_rank_or_run(tmp_path, capsys):
    out = str(tmp_path / "t")
    assert main(["tune", "sklearn:iris", "--out", out, "--val-split", "0"]) == 2
    assert "--val-split must be > 0" in capsys.readouterr().err
    assert main(["tune", "sklearn:iris", "--out", out, "--jobs", "0"]) == 2
    assert main(["tune", "sklearn:iris", "--out", out, "--epochs", "0"]) == 2
    assert "--epochs and --patience must be at least 1" in capsys.readouterr().err
    assert main(["compare", "sklearn:iris", "--out", out, "--jobs", "-1"]) == 2
    assert main(["compare", "sklearn:iris", "--out", out, "--val-split", "0"]) == 2
    assert not (tmp_path / "t").exists()


def _trial_row(trial: int, lr: float) -> dict:
    row = {k: "" for k in CSV_FIELDS}
    row.update(
        trial=trial, round=0, seed=1, lr=lr, beta1=0.9, weight_decay=1e-4, hidden=(8,),
        batch_size=32, bn="before", status="ok", val_accuracy=0.9, val_loss=0.3,
        test_accuracy=0.8, train_accuracy=0.95, epochs=3, seconds=0.1,
    )  # fmt: skip
    return row


def test_resumed_rows_are_typed_and_must_come_from_the_same_search(tmp_path):
    path = tmp_path / "trials.csv"
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerow(_csv_row(_trial_row(0, 0.0123)))
    (row,) = read_trials(path)
    assert row["test_accuracy"] == 0.8 and row["train_accuracy"] == 0.95  # numbers, not text
    # trial 0 of this search (seed 5) samples another learning rate: not the same search
    with pytest.raises(Exception, match="different search"):
        search("sklearn:iris", tmp_path, {}, SearchSpace(), trials=2, rounds=1, seed=5, resume=True)


def test_checkpoint_classes_and_features_of_odd_csvs(tmp_path):
    text = "\ufeffa,species,const\r\n" + "".join(
        f'{i},"{["cat, tabby", "dog"][i % 2]}",7\r\n' for i in range(10)
    )
    data = csv_file(tmp_path / "d.csv", text)
    assert train(tmp_path, data, "--label", "species") == 0
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint.npz")
    assert ckpt.class_names == ["cat, tabby", "dog"] and ckpt.feature_names == ["a", "const"]
    assert ckpt.params["input.std"][1] == 1.0  # the constant feature


def test_evaluate_uses_the_label_column_of_training(tmp_path):
    rows = "".join(f"{i},{['cat', 'dog'][i % 2]},{i % 3}\n" for i in range(12))
    data = csv_file(tmp_path / "d.csv", "a,species,b\n" + rows)
    assert train(tmp_path, data, "--label", "species") == 0
    assert main(["evaluate", str(tmp_path / "out" / "checkpoint.npz"), data]) == 0


def test_divergence_without_validation_keeps_the_last_finite_epoch(monkeypatch):
    import bnserve.models.train as train_module

    calls = iter([False, False, True])
    monkeypatch.setattr(train_module, "diverging", lambda *a: next(calls))
    config = train_module.TrainConfig(hidden=(4,), epochs=5, val_split=0, test_split=0)
    result = train_module.train(config, "sklearn:iris")
    assert result.metrics["diverged"] and result.metrics["best_epoch"] == 2


def test_each_trainer_option_is_declared_once_with_the_registry_choices(monkeypatch) -> None:
    """train, tune and compare take their choices and defaults from TrainConfig and the
    registries: a new activation is valid in every command, a default is shown where it holds."""
    import argparse

    from bnserve.models import options, train

    monkeypatch.setitem(train.CHOICES, "activation", (*train.CHOICES["activation"], "newact"))
    for defaults in (None, {}, {"activation": "sigmoid"}):
        parser = argparse.ArgumentParser()
        options.add_options(parser, ("activation", "lr", "hidden", "population_stats"), defaults)
        args = parser.parse_args(["--activation", "newact", "--hidden", "8,4", "--lr", "0.5"])
        assert (args.activation, args.hidden, args.lr) == ("newact", (8, 4), 0.5)
        empty = parser.parse_args([])
        expected = None if defaults is None else defaults.get("activation", "relu")
        assert empty.activation == expected
        assert empty.population_stats is (None if defaults is None else False)
        shown = (defaults or {}).get("activation", "relu")
        assert f"(default {shown})" in parser.format_help()
    assert options.default_of("lr") == train.TrainConfig().lr
    assert set(options.HELP) >= {"hidden", "activation", "optimizer", "epochs", "label"}
