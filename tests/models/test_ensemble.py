"""`bnserve train --ensemble K`: members, manifest, bagging, the shared split, and the ensemble's
figures recomputed by hand from the members' checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bnserve.cli import main
from bnserve.models.checkpoint import file_sha256, load_checkpoint
from bnserve.models.data import load_dataset, load_for_model
from bnserve.models.ensemble import load_ensemble, train_ensemble
from bnserve.models.train import TrainConfig, evaluation_rows

TINY = ["--epochs", "8", "--hidden", "8,8", "--quiet"]


def _train(out: Path, *extra: str, data: str = "sklearn:iris") -> dict:
    assert main(["train", data, "--out", str(out), "--ensemble", "3", *TINY, *extra]) == 0
    return json.loads((out / "ensemble.json").read_text())


@pytest.fixture(scope="module")
def bagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bagged")
    _train(out, "--bagging", "--jobs", "2", "--seed", "3")
    return out


def test_three_members_and_a_manifest(bagged: Path) -> None:
    manifest = json.loads((bagged / "ensemble.json").read_text())
    assert manifest["format"] == "bnserve-ensemble" and manifest["size"] == 3
    assert manifest["bagging"] is True and manifest["seed"] == 3 and manifest["split_seed"] == 3
    members = manifest["members"]
    assert [m["checkpoint"] for m in members] == [f"member-{i}/checkpoint.npz" for i in range(3)]
    assert len({m["seed"] for m in members}) == 3
    for m in members:
        path = bagged / m["checkpoint"]
        assert m["sha256"] == file_sha256(path)
        ckpt = load_checkpoint(path)
        assert ckpt.config["seed"] == m["seed"] and ckpt.config["split_seed"] == 3
        assert (path.parent / "metrics.json").exists() and (path.parent / "history.csv").exists()
        for key in ("val_accuracy", "test_accuracy"):
            assert m[key] == ckpt.metrics[key]
    for key in ("val_accuracy", "test_accuracy", "val_loss", "test_loss"):
        assert 0 <= manifest["metrics"][key] <= (1 if "accuracy" in key else 10)


def test_bagging_draws_each_member_its_own_rows(bagged: Path) -> None:
    ens = load_ensemble(bagged)
    entries = ens.manifest["members"]
    assert len({m["train_rows_sha256"] for m in entries}) == 3
    for m in entries:
        assert m["n_train_distinct"] < m["n_train"]  # a bootstrap sample repeats rows
    # the standardization is each member's own sample's
    means = [c.params["input.mean"] for c in ens.checkpoints]
    assert not np.allclose(means[0], means[1])
    # ... while the split is shared: the same held-out rows for every member
    assert len({c.metrics["n_test"] for c in ens.checkpoints}) == 1


def test_without_bagging_members_share_rows_and_standardization(tmp_path: Path) -> None:
    manifest = _train(tmp_path, "--jobs", "1")
    assert manifest["bagging"] is False
    assert "train_rows_sha256" not in manifest["members"][0]
    ens = load_ensemble(tmp_path / "ensemble.json")
    first = ens.checkpoints[0].params
    for ckpt in ens.checkpoints[1:]:
        np.testing.assert_array_equal(ckpt.params["input.mean"], first["input.mean"])
        assert not np.array_equal(ckpt.params["output.W"], first["output.W"])  # other seeds


def test_the_ensemble_accuracy_is_the_average_of_the_members_by_hand(bagged: Path) -> None:
    manifest = json.loads((bagged / "ensemble.json").read_text())
    ckpts = [load_checkpoint(bagged / m["checkpoint"]) for m in manifest["members"]]
    X, y = load_for_model("sklearn:iris", ckpts[0].feature_names, ckpts[0].class_names, None)
    held = evaluation_rows(ckpts[0], X, y)
    assert held.split == "test" and len(held.rows) == manifest["metrics"]["n_test"]
    probs = np.mean([c.predict_proba(X[held.rows]) for c in ckpts], axis=0)
    accuracy = float((probs.argmax(axis=1) == y[held.rows]).mean())
    assert accuracy == manifest["metrics"]["test_accuracy"]
    loss = -float(np.log(probs[np.arange(len(held.rows)), y[held.rows]]).mean())
    assert loss == pytest.approx(manifest["metrics"]["test_loss"], rel=1e-12)
    members = [m["test_accuracy"] for m in manifest["members"]]
    assert manifest["metrics"]["members_mean_test_accuracy"] == pytest.approx(np.mean(members))
    assert manifest["metrics"]["members_best_test_accuracy"] == max(members)


def test_parallel_members_equal_serial_ones() -> None:
    config = TrainConfig(hidden=(8,), epochs=3, seed=5, bagging=True)
    runs = [train_ensemble(config, load_dataset("sklearn:iris"), 2, jobs=jobs) for jobs in (1, 2)]
    assert runs[0].seeds == runs[1].seeds
    for a, b in zip(runs[0].members, runs[1].members, strict=True):
        for key, value in a.checkpoint.params.items():
            np.testing.assert_array_equal(value, b.checkpoint.params[key])
    assert runs[0].metrics == runs[1].metrics


def test_options_that_do_not_go_with_an_ensemble(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "o")
    assert main(["train", "sklearn:iris", "--out", out, "--jobs", "2", *TINY]) == 2
    assert "--ensemble" in capsys.readouterr().err
    assert main(["train", "sklearn:iris", "--out", out, "--ensemble", "2", "--stream"]) == 2
    assert "--stream" in capsys.readouterr().err
    assert main(["train", "sklearn:iris", "--out", out, "--ensemble", "0"]) == 2
    assert not (tmp_path / "o").exists()


def test_a_changed_member_is_refused(tmp_path: Path) -> None:
    _train(tmp_path, "--jobs", "1")
    member = tmp_path / "member-1" / "checkpoint.npz"
    member.write_bytes((tmp_path / "member-0" / "checkpoint.npz").read_bytes())
    code = main(["convert", str(tmp_path), "-o", str(tmp_path / "m.onnx"), "-q"])
    assert code == 2 and not (tmp_path / "m.onnx").exists()
