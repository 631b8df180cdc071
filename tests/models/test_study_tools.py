"""evaluate, tune and compare: numbers against direct computations, search behaviour, CLI errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from bnserve.models.checkpoint import load_checkpoint
from bnserve.models.metrics import classification_report
from bnserve.models.tune import SearchSpace, read_trials, sample, search, shrink
from tests.conftest import run_cli


def test_metrics_match_scikit_learn():
    from sklearn import metrics

    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(4), size=200)
    y = rng.integers(0, 4, 200)
    y[:5] = 3  # make sure every class appears
    report = classification_report(y, proba, ["a", "b", "c", "d"])
    pred = proba.argmax(1)
    p, r, f, s = metrics.precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for i, name in enumerate("abcd"):
        c = report["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    assert report["confusion_matrix"] == metrics.confusion_matrix(y, pred, labels=range(4)).tolist()
    assert report["loss"] == pytest.approx(metrics.log_loss(y, proba, labels=range(4)))
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(y, pred))


def test_evaluate_cli_matches_the_checkpoint(iris_run, tmp_path):
    from bnserve.models.data import load_dataset

    result = run_cli(
        "evaluate",
        str(iris_run / "checkpoint.npz"),
        "sklearn:iris",
        "--all-rows",
        "--json",
        "--plot",
        str(tmp_path / "cm.png"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    data = load_dataset("sklearn:iris")
    ckpt = load_checkpoint(iris_run / "checkpoint.npz")
    expected = (ckpt.predict_proba(data.X).argmax(1) == data.y).mean()
    assert report["accuracy"] == pytest.approx(expected) and report["stats"] == "population"
    assert sum(map(sum, report["confusion_matrix"])) == 150
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    text = run_cli(
        "evaluate", str(iris_run / "checkpoint.npz"), "sklearn:iris", "--stats", "running"
    )
    assert text.returncode == 0 and "confusion matrix" in text.stdout and "setosa" in text.stdout


def test_evaluate_errors(iris_run, tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b,label\n1,2,setosa\n")
    result = run_cli("evaluate", str(iris_run / "checkpoint.npz"), str(bad))
    assert result.returncode == 2 and "columns differ from the model's features" in result.stderr
    result = run_cli("evaluate", str(tmp_path / "missing.npz"), "sklearn:iris")
    assert result.returncode == 2 and "no such checkpoint" in result.stderr
    result = run_cli("evaluate", str(iris_run / "checkpoint.npz"), "sklearn:wine")
    assert result.returncode == 2 and "columns differ" in result.stderr


def test_evaluate_csv_with_reordered_columns(iris_run, tmp_path):
    from bnserve.models.data import load_dataset

    data = load_dataset("sklearn:iris")
    names = list(reversed(data.feature_names))
    rows = [
        ",".join(repr(float(v)) for v in x[::-1]) + f",{data.class_names[c]}"
        for x, c in zip(data.X, data.y, strict=True)
    ]
    path = tmp_path / "iris.csv"
    path.write_text(",".join(names) + ",species\n" + "\n".join(rows) + "\n")
    a = json.loads(
        run_cli("evaluate", str(iris_run / "checkpoint.npz"), str(path), "--json").stdout
    )
    b = json.loads(
        run_cli("evaluate", str(iris_run / "checkpoint.npz"), "sklearn:iris", "--json").stdout
    )
    assert a["confusion_matrix"] == b["confusion_matrix"]


def test_evaluate_scores_the_held_out_split_that_train_scored(iris_run):
    metrics = json.loads((iris_run / "metrics.json").read_text())
    ckpt = str(iris_run / "checkpoint.npz")
    report = json.loads(run_cli("evaluate", ckpt, "sklearn:iris", "--json").stdout)
    assert report["split"] == "test" and report["rows_total"] == 150
    assert report["rows_scored"] == report["n"] == metrics["n_test"] == 30
    assert report["accuracy"] == metrics["test_accuracy"]
    assert report["loss"] == pytest.approx(metrics["test_loss"], rel=1e-9)
    assert report["stats"] == metrics["stats"]
    text = run_cli("evaluate", ckpt, "sklearn:iris")
    assert text.returncode == 0 and text.stdout.startswith("held-out split: 30 of 150 rows")
    every = json.loads(run_cli("evaluate", ckpt, "sklearn:iris", "--all-rows", "--json").stdout)
    assert every["split"] == "all" and every["rows_scored"] == every["n"] == 150
    assert every["rows_scored"] != report["rows_scored"]
    text = run_cli("evaluate", ckpt, "sklearn:iris", "--all-rows")
    assert text.stdout.startswith("all 150 rows: --all-rows\naccuracy")


def _small_run(**options):
    from bnserve.models.data import load_dataset
    from bnserve.models.train import TrainConfig, train

    data = load_dataset("sklearn:iris")
    config = TrainConfig(hidden=(4,), epochs=2, **options)
    return data, train(config, data).checkpoint


@pytest.mark.parametrize(
    ("options", "seeded"),
    [({"seed": 3}, 3), ({"seed": 3, "split_seed": 7, "test_split": 0.3}, 7)],
)
def test_evaluation_rows_cut_the_test_part_again(options, seeded):
    """The rows that train held out, with the seed that cut them (tune's split_seed too)."""
    from bnserve.models.train import evaluation_rows

    data, ckpt = _small_run(**options)
    chosen = evaluation_rows(ckpt, data.X, data.y)
    assert chosen.split == "test" and len(chosen.rows) == ckpt.metrics["n_test"]
    assert chosen.note.startswith(f"held-out split: {len(chosen.rows)} of 150 rows")
    assert f"seed {seeded})" in chosen.note
    proba = ckpt.predict_proba(data.X[chosen.rows])
    accuracy = float((proba.argmax(1) == data.y[chosen.rows]).mean())
    assert accuracy == ckpt.metrics["test_accuracy"]
    assert len(evaluation_rows(ckpt, data.X, data.y, all_rows=True).rows) == 150


def test_evaluation_rows_score_everything_and_say_why(tmp_path):
    from bnserve.models.train import evaluation_rows

    data, ckpt = _small_run()
    other = data.X.copy()
    other[0, 0] += 1.0  # one changed value: no longer the training data
    chosen = evaluation_rows(ckpt, other, data.y)
    assert chosen.split == "all" and len(chosen.rows) == 150
    assert chosen.note == (
        "all 150 rows: not the data the model was trained on (the fingerprints differ)"
    )
    data, ckpt = _small_run(test_split=0.0)
    chosen = evaluation_rows(ckpt, data.X, data.y)
    assert chosen.split == "all" and "--test-split 0" in chosen.note
    test_file = tmp_path / "test.npz"
    labels = np.array(data.class_names)[data.y[:20]]
    np.savez(test_file, X=data.X[:20], y=labels, feature_names=data.feature_names)
    data, ckpt = _small_run(test=str(test_file))
    chosen = evaluation_rows(ckpt, data.X, data.y)
    assert chosen.split == "all" and f"separate file ({test_file})" in chosen.note
    ckpt.data_fingerprint = ""
    assert "no fingerprint" in evaluation_rows(ckpt, data.X, data.y).note


def test_sampling_is_log_uniform():
    space = SearchSpace(lr_log10=(-4, 0), one_minus_beta1_log10=(-3, -1))
    rng = np.random.default_rng(0)
    points = [sample(space, rng) for _ in range(4000)]
    exps = np.log10([p["lr"] for p in points])
    # each decade gets about a quarter of the samples (a linear-uniform sampler would put ~90% in the last)
    counts = np.histogram(exps, bins=4, range=(-4, 0))[0] / len(points)
    np.testing.assert_allclose(counts, 0.25, atol=0.03)
    betas = np.array([p["beta1"] for p in points])
    assert betas.min() >= 0.9 and betas.max() <= 0.999
    assert np.mean(betas > 0.99) == pytest.approx(0.5, abs=0.04)  # half of the 1-beta decades


def test_coarse_to_fine_shrinks_around_the_best():
    space = SearchSpace()
    best = [
        {
            "lr": 1e-2,
            "beta1": 0.99,
            "weight_decay": 1e-4,
            "hidden": (64, 64),
            "batch_size": 32,
            "bn": "before",
        },
        {
            "lr": 3e-2,
            "beta1": 0.95,
            "weight_decay": 1e-5,
            "hidden": (128,),
            "batch_size": 32,
            "bn": "after",
        },
    ]
    narrow = shrink(space, best)
    for axis in ("lr_log10", "one_minus_beta1_log10", "weight_decay_log10"):
        lo, hi = getattr(narrow, axis)
        olo, ohi = getattr(space, axis)
        assert olo <= lo < hi <= ohi and hi - lo <= 0.5 * (ohi - olo) + 1e-12
    assert narrow.lr_log10[0] <= -2 and narrow.lr_log10[1] >= math.log10(3e-2)
    assert (
        narrow.widths == (64, 128)
        and narrow.batch_sizes == (32,)
        and narrow.placements == ("before", "after")
    )


def test_search_resume_does_not_repeat_finished_trials(tmp_path):
    base = {"epochs": 3, "patience": 3, "split_seed": 0}
    space = SearchSpace(widths=(8,), depths=(1,), batch_sizes=(32,))
    first = search("sklearn:iris", tmp_path, base, space, trials=6, rounds=2, jobs=2, seed=1)
    assert sorted(r["trial"] for r in first.rows) == list(range(6))
    assert (
        first.boxes[1].lr_log10[1] - first.boxes[1].lr_log10[0] < 3
    )  # round 2 searched a smaller box
    path = tmp_path / "trials.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n")  # as if interrupted after 3 trials
    kept = {r["trial"]: r for r in read_trials(path)}
    ran = []
    second = search(
        "sklearn:iris",
        tmp_path,
        base,
        space,
        trials=6,
        rounds=2,
        jobs=2,
        seed=1,
        resume=True,
        on_trial=lambda row, best: ran.append(row["trial"]),
    )
    assert sorted(ran) == sorted(set(range(6)) - set(kept))
    rows = read_trials(path)
    assert sorted(r["trial"] for r in rows) == list(range(6))
    again = {r["trial"]: r for r in second.rows}
    for t, row in kept.items():
        assert again[t]["lr"] == row["lr"]
    # the re-run trials are the same configurations as in the first search
    firsts = {r["trial"]: r for r in first.rows}
    for t in ran:
        assert again[t]["lr"] == pytest.approx(firsts[t]["lr"]) and again[t][
            "val_accuracy"
        ] == pytest.approx(firsts[t]["val_accuracy"])


def test_tune_cli_best_json_round_trips_into_train(tmp_path):
    out = tmp_path / "tune"
    result = run_cli(
        "tune",
        "sklearn:iris",
        "--out",
        str(out),
        "--trials",
        "4",
        "--rounds",
        "2",
        "--epochs",
        "5",
        "--jobs",
        "2",
        "--widths",
        "8,16",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    for name in ("trials.csv", "best.json", "search.png"):
        assert (out / name).stat().st_size > 0
    best = json.loads((out / "best.json").read_text())
    with open(out / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 4 and max(float(t["val_accuracy"]) for t in trials) == pytest.approx(
        best["val_accuracy"]
    )
    retrained = run_cli(
        "train",
        "sklearn:iris",
        "--out",
        str(tmp_path / "t"),
        "--config",
        str(out / "best.json"),
        "--quiet",
    )
    assert retrained.returncode == 0, retrained.stderr
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["val_accuracy"] == pytest.approx(best["val_accuracy"])  # same seed, same split
    again = run_cli("tune", "sklearn:iris", "--out", str(out), "--trials", "4")
    assert again.returncode == 2 and "--resume" in again.stderr


def test_trials_with_equal_val_accuracy_rank_by_val_loss_then_trial():
    from bnserve.models.tune import best_trials

    def row(trial, accuracy, loss, status="ok"):
        return {"trial": trial, "status": status, "val_accuracy": accuracy, "val_loss": loss}

    rows = [
        row(0, 0.9, 0.30),
        row(1, 0.9, 0.10),
        row(2, 0.8, 0.01),
        row(3, 0.9, 0.10),
        row(4, 0.9, math.nan),
        row(5, 1.0, 0.0, "failed: boom"),
        row(6, 0.9, 0.0),
    ]
    assert [r["trial"] for r in best_trials(rows, 1.0)] == [6, 1, 3, 0, 4, 2]
    assert [r["trial"] for r in best_trials(reversed(rows), 1.0)] == [6, 1, 3, 0, 4, 2]


def _tied_train(config, data):
    """Every trial ties on validation accuracy; a learning rate under 1e-3 gives the loss of a
    perfectly confident model, which float arithmetic computes as -0.0."""
    from types import SimpleNamespace

    loss = -0.0 if config.lr < 1e-3 else config.lr
    metrics = {
        "val_accuracy": 0.9,
        "val_loss": loss,
        "test_accuracy": 0.8,
        "train_accuracy": 1.0,
        "epochs": 1,
        "seconds": 0.01,
    }
    return SimpleNamespace(metrics=metrics)


def test_tune_breaks_ties_by_val_loss_and_never_reports_negative_zero(
    tmp_path, monkeypatch, capsys
):
    import bnserve.models.train
    from bnserve.models.cli import tune_main

    # the trial processes are forked from this one, so they run the patched train
    monkeypatch.setattr(bnserve.models.train, "train", _tied_train)
    out = tmp_path / "tune"
    argv = ["sklearn:iris", "--out", str(out), "--trials", "8", "--rounds", "1", "--jobs", "2"]
    assert tune_main([*argv, "--lr-range", "1e-4,1e-2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    trials_csv = (out / "trials.csv").read_text()
    best_json = (out / "best.json").read_text()
    for text in (printed, trials_csv, best_json):
        assert "-0.0" not in text
    rows = read_trials(out / "trials.csv")
    confident = sorted(r["trial"] for r in rows if r["lr"] < 1e-3)
    assert confident and len(confident) < len(rows)  # both kinds of trial ran
    assert all(math.copysign(1.0, r["val_loss"]) == 1.0 for r in rows)
    best = json.loads(best_json)
    assert best["trial"] == confident[0] and best["val_loss"] == 0.0
    assert "val accuracy 0.9000 (loss 0.0000)" in printed
    # a trials.csv written with -0.0 (by an earlier version) reads back as 0.0
    (out / "old.csv").write_text(trials_csv.replace(",0.0,", ",-0.0,"))
    assert "-0.0" in (out / "old.csv").read_text()
    assert all(math.copysign(1.0, r["val_loss"]) == 1.0 for r in read_trials(out / "old.csv"))


def test_a_perfectly_confident_loss_is_positive_zero():
    from bnserve.models.network import NetworkSpec
    from bnserve.models.train import evaluate

    spec = NetworkSpec(n_features=1, n_classes=2, hidden=(), activation="relu", bn="none")
    params = {
        "input.mean": np.zeros(1),
        "input.std": np.ones(1),
        "output.W": np.array([[1000.0, -1000.0]]),
        "output.b": np.zeros(2),
    }
    loss, accuracy = evaluate(spec, params, np.ones((3, 1)), np.zeros(3, dtype=np.int64))
    assert accuracy == 1.0 and loss == 0.0 and math.copysign(1.0, loss) == 1.0
    proba = np.array([[1.0, 0.0], [1.0, 0.0]])
    report = classification_report(np.array([0, 0]), proba, ["a", "b"])
    assert math.copysign(1.0, report["loss"]) == 1.0


def test_tune_and_compare_cli_errors(tmp_path):
    result = run_cli("tune", "sklearn:iris", "--out", str(tmp_path), "--lr-range", "0.1,0.01")
    assert result.returncode == 2 and "LOW < HIGH" in result.stderr
    result = run_cli(
        "tune", "sklearn:iris", "--out", str(tmp_path), "--placements", "before,sideways"
    )
    assert result.returncode == 2 and "expected a list of before, after, none" in result.stderr
    result = run_cli("compare", str(tmp_path / "none.csv"), "--out", str(tmp_path))
    assert result.returncode == 2 and "no such file" in result.stderr
    result = run_cli("compare", "sklearn:iris", "--out", str(tmp_path), "--lr", "0.1,-1")
    assert result.returncode == 2 and "positive numbers" in result.stderr


@pytest.mark.slow
def test_compare_bn_trains_faster_with_sigmoid_sgd(tmp_path):
    result = run_cli(
        "compare",
        "sklearn:digits",
        "--out",
        str(tmp_path),
        "--lr",
        "0.3",
        "--epochs",
        "10",
        "--jobs",
        "2",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "compare.csv") as f:
        rows = {r["bn"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none", "before", "after"}
    for bn in ("before", "after"):
        assert float(rows[bn]["final_train_loss"]) < float(rows["none"]["final_train_loss"]) / 3
    assert rows["none"]["epochs_to_target"] == "" or int(rows["none"]["epochs_to_target"]) > int(
        rows["before"]["epochs_to_target"]
    )
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_train_cli_reports_divergence_and_writes_nothing(tmp_path):
    result = run_cli(
        "train",
        "sklearn:digits",
        "--out",
        str(tmp_path / "o"),
        "--lr",
        "3",
        "--bn",
        "after",
        "--activation",
        "sigmoid",
        "--optimizer",
        "sgd",
        "--quiet",
    )
    assert result.returncode == 1 and "diverged" in result.stderr and "lower --lr" in result.stderr
    assert not (tmp_path / "o" / "checkpoint.npz").exists()
