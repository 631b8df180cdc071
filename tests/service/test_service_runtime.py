"""Loading models: interface checks, output kind, labels, format version, session options, device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bnserve.errors import ModelError
from bnserve.service.metadata import load_info
from bnserve.service.runtime import ModelRuntime, cuda_available, softmax
from tests.service.support import build_foreign_logits, build_mlp_classifier, reference_run


def test_converter_style_model_is_described_from_its_metadata(tmp_path: Path) -> None:
    runtime = ModelRuntime.load(build_mlp_classifier(tmp_path / "m.onnx"), "m", 1)
    info = runtime.info
    assert (info.input.name, info.n_features, runtime.n_classes) == ("input", 8, 3)
    assert info.score_output == "probabilities"
    assert info.output_kind == "probabilities"
    assert runtime.labels == ("cat", "dog", "bird")
    assert info.feature_names == tuple(f"f{i}" for i in range(8))
    assert info.reports()["fold_report"] == {"folded": 2, "max_abs_diff": 1.2e-7}
    assert runtime.device == "cpu"


def test_foreign_logits_model_gets_default_labels_and_a_softmax(tmp_path: Path) -> None:
    path = build_foreign_logits(tmp_path / "f.onnx")
    runtime = ModelRuntime.load(path, "f", 1)
    assert runtime.info.output_kind == "logits"  # no metadata, does not end in Softmax
    assert runtime.labels == ("0", "1", "2", "3")
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    logits = reference_run(path, x)
    np.testing.assert_allclose(runtime.probabilities(x), softmax(logits), rtol=1e-6)
    np.testing.assert_allclose(runtime.probabilities(x).sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_at_the_end_means_probabilities_and_the_flag_overrides(tmp_path: Path) -> None:
    path = build_mlp_classifier(
        tmp_path / "m.onnx", metadata={"bnserve.output_kind": "unknown"}, logits_output=False
    )
    assert load_info(path).output_kind == "probabilities"  # found the Softmax
    assert load_info(path, "logits").output_kind == "logits"
    foreign = build_foreign_logits(tmp_path / "f.onnx")
    assert load_info(foreign, "probabilities").output_kind == "probabilities"


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = build_mlp_classifier(tmp_path / "m.onnx", metadata={"bnserve.format_version": "2"})
    with pytest.raises(ModelError, match="format version 2 is newer than this service understands"):
        ModelRuntime.load(path, "m", 1)


def test_labels_that_do_not_match_the_classes_are_refused(tmp_path: Path) -> None:
    path = build_mlp_classifier(tmp_path / "m.onnx", metadata={"bnserve.labels": '["a", "b"]'})
    with pytest.raises(
        ModelError, match=r"2 labels in bnserve\.labels but output 'probabilities' has 3"
    ):
        ModelRuntime.load(path, "m", 1)


def test_models_that_are_not_one_input_classifiers_are_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["scores"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
    )
    path = tmp_path / "two.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="expected one input \\[batch, F\\], the graph has 2"):
        load_info(path)


def test_truncated_file_is_a_model_error(tmp_path: Path) -> None:
    good = build_mlp_classifier(tmp_path / "m.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match=r"bad\.onnx"):
        ModelRuntime.load(bad, "bad", 1)


def test_session_is_single_threaded_sequential_and_does_not_spin(tmp_path: Path) -> None:
    runtime = ModelRuntime.load(build_mlp_classifier(tmp_path / "m.onnx"), "m", 1)
    options = runtime.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert runtime.session.get_providers()[0] == "CPUExecutionProvider"


@pytest.mark.skipif(cuda_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_provider_refuses_with_a_reason(tmp_path: Path) -> None:
    path = build_mlp_classifier(tmp_path / "m.onnx")
    with pytest.raises(
        ModelError, match=r"--device cuda: this onnxruntime .* has no CUDAExecutionProvider"
    ):
        ModelRuntime.load(path, "m", 1, device="cuda")
    assert ModelRuntime.load(path, "m", 1, device="auto").device == "cpu"
