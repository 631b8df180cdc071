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
