"""Input features whose mean is far from zero in standard deviations (years, kelvin, prices,
timestamps): the converter keeps the centring as one Sub when the full fold would lose float32
precision, and says so in the fold report; a normal model stays fully folded.

The target on every converted model here: the folded float32 error on the gate's probes is at
most max(2 x the unfolded float32 error, 1e-6), measured independently of the gate with
onnxruntime against the checkpoint's float64 network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnserve.converter import fold, verify
from bnserve.converter.convert import FOLDED_RUNS, UNFOLDED_RUNS, convert_checkpoint
from bnserve.converter.freeze import freeze_checkpoint
from bnserve.converter.frozen import fold_mlp, folded_probabilities
from bnserve.converter.inspect import describe_model, format_description
from bnserve.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tests.conftest import run_cli
from tests.converter.factory import NetConfig, random_checkpoint, raw_inputs, run_onnx


def _offset_checkpoint(seed: int, ratio: float, bn: str = "before", std: float | None = None):
    """A normal random network (means within ~1 std) whose features 1 and 3 sit `ratio` standard
    deviations from zero (3 on the negative side); `std` fixes feature 1's std."""
    ckpt = random_checkpoint(NetConfig(seed=seed, bn=bn, input_offset_sd=1.0))
    mean, sd = ckpt.params["input.mean"], ckpt.params["input.std"]
    if std is not None:
        sd[1] = std
    mean[1] = ratio * sd[1]
    mean[3] = -ratio * sd[3]
    return ckpt


def _target(unfolded_err: float) -> float:
    """The most a folded model may err in float32: max(2 x the unfolded float32 error, 1e-6)."""
    return max(2.0 * unfolded_err, 1e-6)


def _measured(ckpt: Checkpoint, model: Path, unfolded: Path) -> tuple[float, float]:
    """The folded and the unfolded file's float32 errors on the gate's probes, recomputed here:
    onnxruntime (both optimization levels for the folded file) against the float64 network."""
    X = verify.make_probes(ckpt.params["input.mean"], ckpt.params["input.std"])
    ref = ckpt.predict_proba(X.astype(np.float64))
    folded = max(np.abs(run_onnx(model, X, lv) - ref).max() for lv in ("disabled", "all"))
    return float(folded), float(np.abs(run_onnx(unfolded, X, "disabled") - ref).max())


def _convert_both(ckpt: Checkpoint, tmp_path: Path):
    save_checkpoint(ckpt, tmp_path / "c.npz")
    result = convert_checkpoint(tmp_path / "c.npz", tmp_path / "m.onnx")
    convert_checkpoint(tmp_path / "c.npz", tmp_path / "u.onnx", fold=False, atol=1.0)
    return result, *_measured(ckpt, tmp_path / "m.onnx", tmp_path / "u.onnx")


@pytest.mark.parametrize("bn", ["before", "after"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ratio", [1e3, 1e4, 1e5, 1e6])
def test_large_mean_over_std_keeps_the_input_centred(ratio, seed, bn, tmp_path):
    ckpt = _offset_checkpoint(seed, ratio, bn)
    result, folded_err, unfolded_err = _convert_both(ckpt, tmp_path)
    std = result.fold_report["standardization"]
    assert std["centred"] is True, std["decision"]
    assert std["max_abs_mean_over_std"] == pytest.approx(ratio, rel=1e-9)
    errors = std["float32_max_abs_diff"]
    assert errors["full_fold"] > std["decision_bound"] and errors["centred"] < errors["full_fold"]
    # The report states what an independent run measures, and the target holds.
    pr = result.parity_report
    np.testing.assert_allclose(pr["max_abs_diff"], folded_err, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(pr["unfolded_float32_max_abs_diff"], unfolded_err, rtol=1e-6)
    assert errors["centred"] == pr["max_abs_diff"]  # the decision measured the written graph
    assert folded_err <= _target(unfolded_err), (folded_err, unfolded_err)
    assert pr["fold_float64_max_abs_diff"] <= 1e-9
    # One Sub of the float32 means in front of the first Gemm, nothing else added.
    model = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops[:2] == ["Sub", "Gemm"] and ops.count("Sub") == 1 and ops[-1] == "Softmax"
    sub = model.graph.node[0]
    assert sub.input[0] == "input" and model.graph.node[1].input[0] == sub.output[0]
    means = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}[sub.input[1]]
    assert means.dtype == np.float32
    np.testing.assert_array_equal(means, ckpt.params["input.mean"].astype(np.float32))
    # Rows as a client sends them, straight through onnxruntime, against the float64 network.
    X = raw_inputs(ckpt, 500)
    ref = ckpt.predict_proba(X.astype(np.float64))
    assert np.abs(run_onnx(tmp_path / "m.onnx", X) - ref).max() <= 1e-5


def test_year_like_feature_is_centred_and_as_precise_as_unfolded(tmp_path):
    # mean 2008, std 0.8: the full fold measured 1.3e-3 here, the unfolded graph 3.7e-6.
    ckpt = _offset_checkpoint(0, 2008 / 0.8, std=0.8)
    ckpt.params["input.mean"][3] = 0.0  # only the year is far from zero
    result, folded_err, unfolded_err = _convert_both(ckpt, tmp_path)
    std = result.fold_report["standardization"]
    assert std["centred"] is True
    assert std["float32_max_abs_diff"]["full_fold"] > 100 * folded_err
    assert folded_err <= _target(unfolded_err)


@pytest.mark.parametrize("bn", ["before", "after", "none"])
def test_normal_model_stays_fully_folded(bn, tmp_path):
    ckpt = random_checkpoint(NetConfig(bn=bn, input_offset_sd=1.0))
    result, folded_err, unfolded_err = _convert_both(ckpt, tmp_path)
    std = result.fold_report["standardization"]
    assert std["centred"] is False and std["folded_into"] == "hidden.0"
    assert "<=" in std["decision"]
    assert "Sub" not in result.op_counts
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Sub" not in ops and "Div" not in ops
    assert std["float32_max_abs_diff"]["full_fold"] == result.parity_report["max_abs_diff"]
    assert folded_err <= _target(unfolded_err)


def test_centred_fold_arithmetic_models_the_sub():
    ckpt = _offset_checkpoint(1, 1e5)
    net, _ = freeze_checkpoint(ckpt)
    centred = fold_mlp(net, centred=True)
    full = fold_mlp(net)
    assert centred.input_center is not None and full.input_center is None
    # Only the scale 1/std goes into W; the bias moves only by the means' float32 remainder.
    np.testing.assert_array_equal(centred.layers[0].W, full.layers[0].W)
    np.testing.assert_array_equal(centred.input_center.astype(np.float32), centred.input_center)
    X = raw_inputs(ckpt, 200)
    ref = ckpt.predict_proba(X.astype(np.float64))
    assert np.abs(folded_probabilities(centred, X) - ref).max() <= 1e-12
    assert np.abs(folded_probabilities(centred, X, np.float32) - ref).max() <= 1e-5
    assert np.abs(folded_probabilities(full, X, np.float32) - ref).max() > 1e-3


def test_split_float32_is_exact():
    a = np.array([2008.0123456789, -1e6 * 0.37, 0.1, 0.0, 3.0e30])
    hi, lo = fold.split_float32(a)
    np.testing.assert_array_equal(hi.astype(np.float32).astype(np.float64), hi)
    np.testing.assert_array_equal(hi + lo, a)
    assert np.all(np.abs(lo) <= np.abs(a) * 2.0**-24)
    with pytest.raises(ValueError, match="float32"):
        fold.split_float32(np.array([1e39]))


def test_report_names_the_runs_that_make_the_allowance(tmp_path):
    ckpt = _offset_checkpoint(0, 1e4)
    save_checkpoint(ckpt, tmp_path / "c.npz")
    pr = convert_checkpoint(tmp_path / "c.npz", tmp_path / "m.onnx").parity_report
    runs = pr["float32_runs"]
    assert [r["run"] for r in runs] == [*UNFOLDED_RUNS, *FOLDED_RUNS]
    assert runs[0]["max_abs_diff"] == pr["unfolded_float32_max_abs_diff"]
    worst = max(runs, key=lambda r: r["max_abs_diff"])
    assert pr["noise_floor_source"] == worst["run"]
    assert pr["float32_noise_floor"] == worst["max_abs_diff"]
    assert pr["tolerance"] == max(pr["atol"], pr["noise_factor"] * pr["float32_noise_floor"])
    assert pr["tolerance_source"] == "noise_floor"  # the unfolded graph's coarse means
    assert pr["outputs"]["probabilities"]["noise_floor_source"] == pr["noise_floor_source"]
    # No fold, no folded runs.
    save_checkpoint(random_checkpoint(NetConfig(input_offset_sd=1.0)), tmp_path / "n.npz")
    pr = convert_checkpoint(
        tmp_path / "n.npz", tmp_path / "n.onnx", fold=False, atol=1e-3
    ).parity_report
    assert [r["run"] for r in pr["float32_runs"]] == list(UNFOLDED_RUNS)
    assert pr["tolerance_source"] == "atol" and pr["tolerance"] == pr["atol"] == 1e-3


def test_cli_and_inspect_say_why_and_what_the_allowance_is(tmp_path):
    ckpt = _offset_checkpoint(0, 2008 / 0.8, std=0.8)
    save_checkpoint(ckpt, tmp_path / "c.npz")
    r = run_cli("convert", str(tmp_path / "c.npz"), "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Sub x1" in out and "input kept centred" in out and "full fold" in out
    assert "float32 cancels" in out
    (allowed,) = [line for line in out.splitlines() if line.startswith("allowed ")]
    assert " = 4 x float32 noise floor " in allowed and ", set by " in allowed
    for name in (*UNFOLDED_RUNS, *FOLDED_RUNS):
        assert name in allowed
    r = run_cli("convert", str(tmp_path / "c.npz"), "-o", str(tmp_path / "a.onnx"), "--atol", "0.5")
    assert "allowed 0.5 = atol 0.5 (above 4 x float32 noise floor" in r.stdout
    # inspect shows the same, from the metadata.
    model = onnx.load(str(tmp_path / "m.onnx"))
    text = format_description(describe_model(model))
    assert "input kept centred" in text and " = 4 x float32 noise floor " in text
    meta = {p.key: p.value for p in model.metadata_props}
    report = json.loads(meta["bnserve.fold_report"])["standardization"]
    assert set(report["float32_max_abs_diff"]) == {"full_fold", "centred", "unfolded"}
    assert report["decision"] in text


def test_reports_written_before_the_breakdown_still_inspect():
    desc = {
        "ir_version": 10,
        "producer": "bnserve 0.1.0",
        "opset": {"ai.onnx": 21},
        "graph_name": "g",
        "inputs": [],
        "outputs": [],
        "nodes": 0,
        "operators": {},
        "initializers": 0,
        "parameters": 0,
        "metadata": {},
        "bnserve": {
            "fold_report": {
                "folded": True,
                "standardization": {"folded_into": "hidden.0", "max_abs_inv_std": 1.0},
            },
            "parity_report": {"passed": True, "tolerance": 1e-5, "atol": 1e-5},
        },
    }
    text = format_description(desc)
    assert "standardization -> hidden.0 (max |1/std| 1)" in text
    assert "allowed 1e-05 (atol 1e-05)" in text


def test_trained_model_with_a_year_column(tmp_path):
    """Through the trainer: a CSV whose year column is 2007..2009 (mean ~2008, std ~0.8)."""
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 3)) + y[:, None]
    year = rng.choice([2007, 2008, 2009], size=n)
    lines = ["a,b,c,year,label"] + [
        f"{r[0]:.5f},{r[1]:.5f},{r[2]:.5f},{yr},k{k}" for r, yr, k in zip(X, year, y, strict=True)
    ]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "run")
    r = run_cli("train", str(tmp_path / "d.csv"), "--out", out, "--epochs", "20", "--quiet")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    result, folded_err, unfolded_err = _convert_both(ckpt, tmp_path)
    assert result.fold_report["standardization"]["centred"] is True
    assert folded_err <= _target(unfolded_err)
