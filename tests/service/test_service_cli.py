"""`bnserve serve` configuration (environment and flags), `bnserve predict`, and `bnserve up`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnserve import up
from bnserve.cli import main
from bnserve.errors import UsageError
from bnserve.service.cli import config_from_args, predict_main
from bnserve.service.config import cgroup_cpu_limit, default_workers
from bnserve.service.gunicorn_conf import gunicorn_settings
from tests.service.support import FEATURE_NAMES, LABELS, build_mlp_classifier, reference_run


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "MODEL",
        "MODEL_NAME",
        "DEVICE",
        "WORKERS",
        "THREADS",
        "PORT",
        "HOST",
        "LOG_LEVEL",
        "WORKER_CLASS",
        "MODEL_CONTROL",
        "ACCESS_LOG",
        "ALLOW_SIGNATURE_CHANGE",
        "MAX_REQUESTS",
        "MAX_REQUESTS_JITTER",
        "DRAIN_SECONDS",
        "MAX_BODY_MB",
        "METRICS_DIR",
        "BODY_TIMEOUT",
    ):
        monkeypatch.delenv(f"BNSERVE_{name}", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return monkeypatch


def test_environment_gives_defaults_and_flags_win(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        "MODEL": "/models/m.onnx",
        "MODEL_NAME": "digits",
        "DEVICE": "auto",
        "WORKERS": "3",
        "THREADS": "2",
        "PORT": "9000",
        "HOST": "0.0.0.0",
        "LOG_LEVEL": "warning",
    }.items():
        clean_env.setenv(f"BNSERVE_{name}", value)
    config = config_from_args([])
    assert (config.model, config.model_name, config.device) == ("/models/m.onnx", "digits", "auto")
    assert (config.workers, config.threads, config.port, config.host) == (3, 2, 9000, "0.0.0.0")
    assert config.log_level == "warning"
    config = config_from_args(["other.onnx", "--port", "8001", "--workers", "1", "--device", "cpu"])
    assert (config.model, config.port, config.workers, config.device) == (
        "other.onnx",
        8001,
        1,
        "cpu",
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("WORKERS", "many", "BNSERVE_WORKERS must be an integer, got 'many'"),
        ("WORKERS", "0", "BNSERVE_WORKERS must be at least 1"),
        ("DEVICE", "tpu", "BNSERVE_DEVICE must be one of cpu, cuda, auto"),
    ],
)
def test_bad_environment_values_name_the_variable(
    clean_env: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    clean_env.setenv(f"BNSERVE_{name}", value)
    with pytest.raises(UsageError, match=message):
        config_from_args(["m.onnx"])


def test_gunicorn_settings(clean_env: pytest.MonkeyPatch) -> None:
    settings = gunicorn_settings(config_from_args(["m.onnx", "--workers", "2", "--host", "::1"]))
    assert settings["bind"] == ["[::1]:8000"]
    assert (settings["workers"], settings["worker_class"]) == (
        2,
        "bnserve.service.workers.GeventWorker",
    )
    assert (settings["keepalive"], settings["worker_connections"]) == (5, 1000)
    assert settings["preload_app"] is False
    assert settings["control_socket_disable"] is True
    assert (
        gunicorn_settings(config_from_args(["m.onnx", "--threads", "4"]))["worker_class"]
        == "gthread"
    )
    settings = gunicorn_settings(
        config_from_args(["m.onnx", "--worker-class", "sync", "--keep-alive", "2"])
    )
    assert (settings["worker_class"], settings["keepalive"]) == ("sync", 2)
    with pytest.raises(UsageError, match="--threads 4 needs --worker-class gthread"):
        config_from_args(["m.onnx", "--threads", "4", "--worker-class", "gevent"])
    clean_env.setenv("BNSERVE_WORKER_CLASS", "sync")
    clean_env.setenv("BNSERVE_MODEL_CONTROL", "explicit")
    config = config_from_args(["m.onnx"])
    assert (config.worker_class, config.model_control) == ("sync", "explicit")


def test_default_workers_honour_the_cgroup_cpu_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    missing = tmp_path / "missing"
    cpu_max.write_text("200000 100000\n")  # docker run --cpus 2
    assert cgroup_cpu_limit(cpu_max, missing, missing) == 2.0
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_limit(cpu_max, missing, missing) == 1.5
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max, missing, missing) is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("300000\n")
    period.write_text("100000\n")
    assert cgroup_cpu_limit(missing, quota, period) == 3.0  # cgroup v1
    quota.write_text("-1\n")
    assert cgroup_cpu_limit(missing, quota, period) is None
    assert 1 <= default_workers() <= len(os.sched_getaffinity(0))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_mlp_classifier(tmp_path / "m.onnx", seed=3)


def _read(out: Path) -> tuple[list[str], np.ndarray, list[str]]:
    with out.open() as f:
        rows = list(csv.reader(f))
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]], dtype=np.float32)
    return rows[0], probs, [r[0] for r in rows[1:]]


def test_predict_csv_by_feature_names_in_any_column_order(model: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["target", *reversed(FEATURE_NAMES)])
        for row in x:
            writer.writerow([0, *(repr(float(v)) for v in reversed(row))])
    out = tmp_path / "out.csv"
    assert main(["predict", str(model), str(data), "-o", str(out)]) == 0
    header, probs, labels = _read(out)
    assert header == ["label", "class_index", "p_cat", "p_dog", "p_bird"]
    expected = reference_run(model, x)
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-9)
    assert labels == [LABELS[i] for i in expected.argmax(axis=1)]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_predict_npz_and_headerless_csv_agree(model: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(size=(7, 8))
    np.savez(tmp_path / "d.npz", X=x)
    np.savetxt(tmp_path / "d.csv", x, delimiter=",")
    assert predict_main([str(model), str(tmp_path / "d.npz"), "-o", str(tmp_path / "a.csv")]) == 0
    assert predict_main([str(model), str(tmp_path / "d.csv"), "-o", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    np.testing.assert_allclose(_read(tmp_path / "a.csv")[1], reference_run(model, x), rtol=1e-6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("f0,f1,f2\n1,2,3\n", "5 of the model's feature columns are missing: f3, f4, f5, f6, f7"),
        ("1,2,3\n", "3 columns, the model expects 8 features"),
        (
            ",".join(FEATURE_NAMES) + "\n1,2,3,4,5,6,7,x\n",
            "line 2, column 'f7': 'x' is not a number",
        ),
        (",".join(FEATURE_NAMES) + "\n1,2,3,4,5,6,7,nan\n", "row 0 has NaN or infinite values"),
        (
            "# exported by some tool\n" + ",".join(FEATURE_NAMES) + "\n1,2,3,4,5,6,7,8\n",
            "missing: f0, f1, f2, f3, f4, ...; the header starts with '#': CSV has no comment lines",
        ),
    ],
)
def test_predict_mismatched_columns_are_clear_errors(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(content)
    out = tmp_path / "out.csv"
    assert main(["predict", str(model), str(data), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_predict_reads_any_csv_name_like_train_and_refuses_binary_data(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    x = np.random.default_rng(5).normal(size=(3, 8))
    data = tmp_path / "data.tsv.export"  # train reads any name but .npz as a CSV; so does predict
    rows = [",".join(FEATURE_NAMES)] + [",".join(repr(float(v)) for v in r) for r in x]
    data.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")  # with a byte-order mark
    out = tmp_path / "out.csv"
    assert main(["predict", str(model), str(data), "-o", str(out)]) == 0
    np.testing.assert_allclose(_read(out)[1], reference_run(model, x), rtol=1e-6)
    assert main(["predict", str(model), str(model), "-o", str(out)]) == 2
    assert "not a UTF-8 text CSV file" in capsys.readouterr().err


def test_predict_into_a_directory_is_refused_and_keeps_nothing(model: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", X=np.zeros((2, 8)))
    with pytest.raises(UsageError, match="is a directory"):
        predict_main([str(model), str(tmp_path / "d.npz"), "-o", str(tmp_path)])


IRIS_LABELS = ["setosa", "versicolor", "virginica"]


@pytest.fixture
def iris_model(tmp_path: Path) -> Path:
    """An iris-shaped classifier whose feature names run in the reverse of the data's order."""
    from sklearn.datasets import load_iris

    names = list(reversed(load_iris().feature_names))
    return build_mlp_classifier(
        tmp_path / "iris.onnx", seed=4, n_features=4, labels=IRIS_LABELS, feature_names=names
    )


def test_predict_reads_a_bundled_data_set_like_train(
    iris_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from sklearn.datasets import load_iris

    out = tmp_path / "out.csv"
    assert main(["predict", str(iris_model), "sklearn:iris", "-o", str(out)]) == 0
    header, probs, labels = _read(out)
    assert header == ["label", "class_index", *(f"p_{c}" for c in IRIS_LABELS)]
    x = load_iris().data[:, ::-1]  # the model's column order: matched by name, label left out
    expected = reference_run(iris_model, x)
    assert probs.shape == (150, 3)
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-9)
    assert labels == [IRIS_LABELS[i] for i in expected.argmax(axis=1)]
    assert "150 rows scored" in capsys.readouterr().out
    # -o - writes the same CSV to standard output, and the summary line to standard error
    assert main(["predict", str(iris_model), "sklearn:iris", "-o", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out.replace("\r\n", "\n") == out.read_text().replace("\r\n", "\n")
    assert "150 rows scored" in captured.err and "standard output" in captured.err
    assert not (Path.cwd() / "-").exists()


def test_predict_bundled_data_errors_name_the_set_or_the_extra(
    iris_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = str(tmp_path / "out.csv")
    assert main(["predict", str(iris_model), "sklearn:nope", "-o", out]) == 2
    assert "unknown bundled data set" in capsys.readouterr().err
    assert main(["predict", str(iris_model), "sklearn:wine", "-o", out]) == 2
    assert "4 of the model's feature columns are missing" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    assert main(["predict", str(iris_model), "sklearn:iris", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "needs the 'train' extra" in err and "pip install 'bnserve[train]'" in err
    assert not Path(out).exists()


def test_predict_imports_the_trainer_only_for_a_bundled_data_set() -> None:
    code = (
        "import sys, bnserve.service.cli, bnserve.service.offline; "
        "print(sorted(m for m in sys.modules if m.startswith(('bnserve.models', 'sklearn'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_up_trains_converts_and_serves_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls: list[list[str]] = []
    workdir = tmp_path / "default"

    def fake_main(argv: list[str]) -> int:
        calls.append(argv)
        if argv[0] == "train":
            Path(argv[argv.index("--out") + 1], "checkpoint.npz").write_bytes(b"ckpt")
        elif argv[0] == "convert":
            build_mlp_classifier(Path(argv[argv.index("-o") + 1]))
        return 0

    monkeypatch.setattr(up.cli, "main", fake_main)
    monkeypatch.setattr(up, "run_in_child", fake_main)
    workdir.mkdir()
    assert up.up_main(["--dir", str(workdir), "--port", "8123"]) == 0
    assert [c[0] for c in calls] == ["train", "convert", "serve"]
    assert calls[0] == ["train", "sklearn:digits", "--out", str(workdir)]
    assert calls[1] == [
        "convert",
        str(workdir / "checkpoint.npz"),
        "-o",
        str(workdir / "model.onnx"),
    ]
    assert calls[2][:4] == ["serve", str(workdir / "model.onnx"), "--model-name", "digits"]
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8123" in out
    assert "curl -s http://127.0.0.1:8123/predict" in out and '"features":[0.0,0.0,0.0,0.0,' in out

    calls.clear()
    assert up.up_main(["--dir", str(workdir)]) == 0
    assert [c[0] for c in calls] == ["serve"]  # both files are there and up to date


def test_up_stops_when_a_stage_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(up.cli, "main", lambda argv: 3)
    monkeypatch.setattr(up, "run_in_child", lambda argv: 3)
    with pytest.raises(up.UpError, match=r"'bnserve train sklearn:digits --out .*' failed") as info:
        up.up_main(["--dir", str(tmp_path)])
    assert info.value.exit_code == 3


def test_help_and_version_work_whatever_the_environment_holds(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("BNSERVE_PORT", "abc")
    clean_env.setenv("BNSERVE_WORKERS", "-3")
    for flag in ("--help", "--version"):
        with pytest.raises(SystemExit) as done:
            config_from_args([flag])
        assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "env BNSERVE_PORT" in out and "--keep-alive" in out and "bnserve 0." in out
    with pytest.raises(UsageError, match="BNSERVE_PORT must be an integer, got 'abc'"):
        config_from_args(["m.onnx", "--workers", "2"])
    # the flag wins, so the bad variable is never read
    assert config_from_args(["m.onnx", "--port", "9", "--workers", "2"]).port == 9


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--body-timeout", "0"], {}, "must be > 0"),
        (["--port", "70000"], {}, "must be at most 65535"),
        (["--model-control", "auto"], {}, "must be one of none, explicit, poll"),
        ([], {"BNSERVE_ACCESS_LOG": "maybe"}, "BNSERVE_ACCESS_LOG must be true or false"),
        ([], {"BNSERVE_DRAIN_SECONDS": "-1"}, "BNSERVE_DRAIN_SECONDS must be >= 0"),
        ([], {"BNSERVE_MAX_BODY_MB": "0"}, "BNSERVE_MAX_BODY_MB must be > 0"),
    ],
)
def test_bad_values_name_the_flag_or_variable(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    if env:
        with pytest.raises(UsageError, match=message):
            config_from_args(["m.onnx", *argv])
        return
    with pytest.raises(SystemExit) as done:
        config_from_args(["m.onnx", *argv])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_every_option_has_one_declaration_and_reaches_the_config(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("BNSERVE_ACCESS_LOG", "off")
    clean_env.setenv("BNSERVE_ALLOW_SIGNATURE_CHANGE", "yes")
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/prom")
    clean_env.setenv("BNSERVE_MAX_REQUESTS", "50")
    config = config_from_args(["m.onnx", "--body-timeout", "2.5", "--max-body-mb", "1"])
    assert (config.access_log, config.allow_signature_change) == (False, True)
    assert (config.metrics_dir, config.max_requests, config.max_requests_jitter) == (
        "/tmp/prom",
        50,
        5,
    )
    assert (config.body_timeout, config.max_body_bytes) == (2.5, 1024 * 1024)
    assert config_from_args(["m.onnx", "--access-log"]).access_log is True
