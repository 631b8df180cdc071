"""`bnserve convert` / `bnserve inspect` through the real CLI: exit codes, messages, no leftovers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnserve.cli import main
from bnserve.models.checkpoint import save_checkpoint
from tests.conftest import run_cli
from tests.converter.factory import NetConfig, random_checkpoint, write_checkpoint


def _refused(tmp_path: Path, ckpt: Path, *extra: str, code: int = 2, match: str = "") -> str:
    before = sorted(os.listdir(tmp_path))
    r = run_cli("convert", str(ckpt), "-o", str(tmp_path / "out" / "m.onnx"), *extra)
    assert r.returncode == code, r.stderr
    assert "bnserve convert: error:" in r.stderr and "Traceback" not in r.stderr
    assert match in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no output file, no temp file, no folder
    return r.stderr


def _corrupted(tmp_path: Path, name: str, value: float, index: int = 0) -> Path:
    ckpt = random_checkpoint(NetConfig())
    ckpt.params[name] = ckpt.params[name].copy()
    ckpt.params[name].flat[index] = value
    save_checkpoint(ckpt, tmp_path / "bad.npz")
    return tmp_path / "bad.npz"


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("hidden.0.W", np.nan, "non-finite"),
        ("hidden.1.running_mean", np.inf, "non-finite"),
        ("output.b", -np.inf, "non-finite"),
        ("hidden.0.running_var", -0.5, "negative variance"),
    ],
)
def test_refuses_nan_inf_and_negative_variance(tmp_path, name, value, match):
    _refused(tmp_path, _corrupted(tmp_path, name, value), match=match)


def test_refuses_bad_checkpoint_files(tmp_path):
    good = write_checkpoint(NetConfig(), tmp_path / "good.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused(tmp_path, tmp_path / "garbage.npz", match="garbage.npz")
    _refused(tmp_path, tmp_path / "truncated.npz", match="truncated.npz")
    _refused(tmp_path, tmp_path / "missing.npz", match="no such checkpoint")
    with np.load(good) as npz:
        arrays = dict(npz)
    header = json.loads(bytes(arrays["__header__"]).decode())
    header["format_version"] = 99
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "newer.npz", **arrays)
    _refused(tmp_path, tmp_path / "newer.npz", match="newer")


def test_refuses_output_path_that_is_a_directory(tmp_path):
    ckpt = write_checkpoint(NetConfig(), tmp_path / "c.npz")
    (tmp_path / "adir").mkdir()
    r = run_cli("convert", str(ckpt), "-o", str(tmp_path / "adir"))
    assert r.returncode == 2 and "is a directory" in r.stderr
    assert os.listdir(tmp_path / "adir") == []


def test_parity_failure_exits_3_with_worst_row_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    # A fold that forgets beta: the float64 check must catch it (in-process to inject the bug).
    from bnserve.converter import fold

    real = fold.fold_bn_into_preceding_linear

    def wrong(W, b, gamma, beta, mean, var, eps):
        return real(W, b, gamma, np.zeros_like(beta), mean, var, eps)

    monkeypatch.setattr(fold, "fold_bn_into_preceding_linear", wrong)
    ckpt = write_checkpoint(NetConfig(), tmp_path / "c.npz")
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 3
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "probe row" in err and "input row" in err
    assert sorted(os.listdir(tmp_path)) == before


def test_large_scale_warns_and_is_recorded(tmp_path):
    ckpt = random_checkpoint(NetConfig(input_offset_sd=1.0))
    ckpt.params["hidden.0.gamma"][0] = 100.0
    ckpt.params["hidden.0.running_var"][0] = 0.0  # s = 100 / sqrt(1e-5) = 3.2e4
    save_checkpoint(ckpt, tmp_path / "c.npz")
    r = run_cli("convert", str(tmp_path / "c.npz"), "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "max |s|" in r.stderr
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    report = json.loads(meta["bnserve.fold_report"])
    assert report["bn_layers"][0]["large_scale"] is True and report["warnings"]


def test_inspect_our_model_foreign_model_and_garbage(tmp_path):
    ckpt = write_checkpoint(NetConfig(), tmp_path / "c.npz")
    assert run_cli("convert", str(ckpt), "-o", str(tmp_path / "m.onnx"), "-q").returncode == 0
    r = run_cli("inspect", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    for text in (
        "input: float32 [batch, 6]",
        "probabilities: float32 [batch, 3]",
        "Gemm x3",
        "opset ai.onnx 21",
        "parity report: passed",
        "into preceding linear",
    ):
        assert text in r.stdout, r.stdout
    desc = json.loads(run_cli("inspect", str(tmp_path / "m.onnx"), "--json").stdout)
    # The factory's default input means sit up to 35 std from zero: the full fold erred 1.5e-5 in
    # float32, keeping the input centred 1.5e-6, so the converter keeps one Sub of the means.
    assert desc["operators"] == {"Gemm": 3, "Relu": 2, "Softmax": 1, "Sub": 1}
    assert "input kept centred" in r.stdout
    assert desc["bnserve"]["parity_report"]["passed"] is True
    # A model from elsewhere: no bnserve metadata, said plainly.
    h = onnx.helper
    g = h.make_graph(
        [h.make_node("Relu", ["x"], ["y"])],
        "foreign",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(h.make_model(g), str(tmp_path / "foreign.onnx"))
    r = run_cli("inspect", str(tmp_path / "foreign.onnx"))
    assert r.returncode == 0 and "bnserve metadata: none" in r.stdout
    (tmp_path / "junk.onnx").write_bytes(b"")
    r = run_cli("inspect", str(tmp_path / "junk.onnx"))
    assert r.returncode == 2 and "not an ONNX model" in r.stderr
