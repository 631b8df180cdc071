"""`bnserve train` through the real CLI: outputs, data errors, config precedence, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnserve.models.checkpoint import load_checkpoint
from tests.conftest import run_cli


def write(path, text: str):
    path.write_text(text)
    return str(path)


def test_outputs_and_metrics(iris_run):
    for name in ("checkpoint.npz", "metrics.json", "history.csv", "curves.png"):
        assert (iris_run / name).stat().st_size > 0, name
    metrics = json.loads((iris_run / "metrics.json").read_text())
    for key in (
        "test_accuracy",
        "train_accuracy",
        "val_accuracy",
        "test_loss",
        "epochs",
        "seconds",
    ):
        assert key in metrics
    ckpt = load_checkpoint(iris_run / "checkpoint.npz")
    assert ckpt.class_names == ["setosa", "versicolor", "virginica"]
    assert ckpt.stats_default == "population" and ckpt.has_population_stats
    assert ckpt.spec.hidden == (16, 16) and ckpt.spec.bn_momentum == 0.1
    assert len(ckpt.data_fingerprint) == 64
    assert ckpt.metrics["test_accuracy"] == metrics["test_accuracy"]
    lines = (iris_run / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss") and len(lines) == metrics["epochs"] + 1


def test_checkpoint_round_trip_reproduces_metrics(iris_run):
    """Re-evaluating the saved checkpoint gives the recorded train accuracy (same data, same seed)."""
    from bnserve.models.data import load_dataset, stratified_split

    ckpt = load_checkpoint(iris_run / "checkpoint.npz")
    data = load_dataset("sklearn:iris")
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(4)[0])
    _rest, test = stratified_split(data.y, 0.2, rng)
    probs = ckpt.predict_proba(data.X[test])
    acc = float((probs.argmax(1) == data.y[test]).mean())
    assert acc == pytest.approx(ckpt.metrics["test_accuracy"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("a,b,label\n1,2,x\n3,4\n", "row 3 has 2 fields, expected 3"),
        ("a,b,label\n1,inf,x\n3,4,y\n", "row 2, column 'b': 'inf' is not a finite number"),
        ("a,b,label\n1,inf,x\n-inf,4,y\n", "row 3, column 'a': '-inf' is not a finite"),
        ("a,b,label\n1,2,x\n3,4,x\n", "only one class"),
        ("a,b,label\n", "only a header row"),
    ],
)
def test_bad_csv_exit_2_with_row_and_column(tmp_path, content, message):
    data = write(tmp_path / "bad.csv", content)
    out = tmp_path / "out"
    result = run_cli("train", data, "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "bad.csv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoint.npz").exists()


def test_missing_file_label_column_and_bad_test_file(tmp_path):
    result = run_cli("train", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no such file" in result.stderr
    data = write(
        tmp_path / "d.csv", "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20))
    )
    result = run_cli("train", data, "--out", str(tmp_path / "o"), "--label", "klass")
    assert result.returncode == 2 and "label column 'klass' not found" in result.stderr
    other = write(tmp_path / "t.csv", "a,c,label\n1,2,0\n2,3,1\n")
    result = run_cli("train", data, "--out", str(tmp_path / "o"), "--test", other)
    assert result.returncode == 2 and "columns differ" in result.stderr
    assert not (tmp_path / "o" / "checkpoint.npz").exists()


def test_string_labels_csv_test_file_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3))
    labels = np.where(X[:, 0] > 0, "pos", "neg")
    rows = "".join(f"{a},{b},{c},{lab}\n" for (a, b, c), lab in zip(X, labels, strict=True))
    train_csv = write(tmp_path / "train.csv", "f1,f2,f3,kind\n" + rows)
    test_csv = write(tmp_path / "test.csv", "f1,f2,f3,kind\n" + rows[: rows.index("\n", 200) + 1])
    result = run_cli(
        "train",
        train_csv,
        "--out",
        str(tmp_path / "a"),
        "--test",
        test_csv,
        "--epochs",
        "5",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    assert ckpt.class_names == ["neg", "pos"] and ckpt.feature_names == ["f1", "f2", "f3"]
    np.savez(tmp_path / "d.npz", X=X, y=(X[:, 0] > 0).astype(int))
    result = run_cli(
        "train",
        str(tmp_path / "d.npz"),
        "--out",
        str(tmp_path / "b"),
        "--epochs",
        "3",
        "--test-split",
        "0",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["test_accuracy"] is None


def test_config_file_and_command_line_precedence(tmp_path):
    config = write(
        tmp_path / "c.json", json.dumps({"hidden": [8], "epochs": 2, "lr": 0.01, "bn": "after"})
    )
    result = run_cli(
        "train",
        "sklearn:iris",
        "--out",
        str(tmp_path / "o"),
        "--config",
        config,
        "--bn",
        "none",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "o" / "checkpoint.npz")
    assert ckpt.spec.hidden == (8,) and ckpt.spec.bn == "none" and ckpt.config["lr"] == 0.01
    bad = write(tmp_path / "bad.json", json.dumps({"hiden": [8]}))
    result = run_cli("train", "sklearn:iris", "--out", str(tmp_path / "x"), "--config", bad)
    assert result.returncode == 2 and "unknown options hiden" in result.stderr


def test_bad_options_are_usage_errors(tmp_path):
    result = run_cli("train", "sklearn:iris", "--out", str(tmp_path / "o"), "--batch-size", "1")
    assert result.returncode == 2 and "at least 2" in result.stderr
    result = run_cli("train", "sklearn:iris", "--out", str(tmp_path / "o"), "--hidden", "10,x")
    assert result.returncode == 2 and "comma-separated integers" in result.stderr
    result = run_cli("train", "sklearn:nope", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown bundled data set" in result.stderr


def test_corrupt_truncated_and_newer_checkpoints_fail_clearly(iris_run, tmp_path):
    good = iris_run / "checkpoint.npz"
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    from bnserve.errors import CheckpointError
    from bnserve.models.checkpoint import Checkpoint, save_checkpoint

    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(path)
    ckpt = load_checkpoint(good)
    newer = tmp_path / "newer.npz"
    save_checkpoint(ckpt, newer)
    import bnserve.models.checkpoint as cp

    old = cp.FORMAT_VERSION
    try:
        cp.FORMAT_VERSION = old + 1
        save_checkpoint(Checkpoint(**vars(ckpt)), newer)
    finally:
        cp.FORMAT_VERSION = old
    with pytest.raises(CheckpointError, match="newer than this bnserve reads"):
        load_checkpoint(newer)


def test_missing_train_extra_names_the_extra(tmp_path):
    # A shadowing module makes `import tqdm` fail, as on a base-only install.
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "tqdm.py").write_text("raise ImportError('tqdm is not installed')\n")
    result = run_cli(
        "train", "sklearn:iris", "--out", str(tmp_path / "o"), env={"PYTHONPATH": str(blocker)}
    )
    assert result.returncode == 2
    assert "pip install 'bnserve[train]'" in result.stderr and "Traceback" not in result.stderr


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = run_cli("train", "sklearn:iris", "--out", str(f))
    assert result.returncode == 2 and "not a folder" in result.stderr
    assert f.read_text() == "x"


def test_outputs_are_readable_by_others(iris_run):
    # mkstemp's 0600 must not survive the rename: a service in a container runs as another user
    for name in ("checkpoint.npz", "metrics.json", "history.csv", "curves.png"):
        assert (iris_run / name).stat().st_mode & 0o044 == 0o044, name


def test_non_integer_format_version_is_invalid_not_newer(iris_run, tmp_path):
    import bnserve.models.checkpoint as cp
    from bnserve.errors import CheckpointError

    ckpt = load_checkpoint(iris_run / "checkpoint.npz")
    path = tmp_path / "float_version.npz"
    old = cp.FORMAT_VERSION
    try:
        cp.FORMAT_VERSION = 1.0
        cp.save_checkpoint(ckpt, path)
    finally:
        cp.FORMAT_VERSION = old
    with pytest.raises(CheckpointError, match="is not an integer"):
        load_checkpoint(path)
