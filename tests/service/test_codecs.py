"""The protocol codecs as pure functions, without a socket or a server: Open Inference Protocol
tensors (JSON and binary, compared with tritonclient's own encoders and decoders), the body split,
the classification extension, and the simple API's request parsing on a loaded runtime."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tritonclient.utils as triton

from bnserve.service.columns import RawColumn, decode_column, feeds_from_rows, unknown_categories
from bnserve.service.errors import BadRequestError, PayloadTooLargeError
from bnserve.service.runtime import ModelRuntime
from bnserve.service.simple_api import parse_predict_request, predictions
from bnserve.service.v2 import split_body
from bnserve.service.v2_tensors import (
    NUMERIC_DATATYPES,
    classify,
    datatype_of,
    decode_input,
    encode_output,
)
from tests.service.support import FEATURE_NAMES, LABELS, build_mlp_classifier

F = 4


def tensor(data=None, shape=(2, F), datatype="FP32", **parameters) -> dict:
    entry = {"name": "input", "shape": list(shape), "datatype": datatype}
    if data is not None:
        entry["data"] = data
    if parameters:
        entry["parameters"] = parameters
    return entry


@pytest.mark.parametrize("datatype", sorted(NUMERIC_DATATYPES))
def test_datatype_names_match_tritonclient(datatype: str) -> None:
    dtype = NUMERIC_DATATYPES[datatype]
    assert datatype_of(dtype) == triton.np_to_triton_dtype(dtype) == datatype


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "INT32", "UINT8"])
def test_binary_and_json_inputs_decode_to_the_same_array(datatype: str) -> None:
    source = NUMERIC_DATATYPES[datatype]
    values = (np.arange(2 * F) * 3 % 7).astype(source).reshape(2, F)
    raw = values.tobytes()  # tritonclient sends numeric tensors as their little-endian bytes
    from_binary = decode_input(
        tensor(shape=values.shape, datatype=datatype, binary_data_size=len(raw)),
        raw,
        "input",
        F,
        np.dtype(np.float32),
        64,
    )
    from_json = decode_input(
        tensor(values.ravel().tolist(), values.shape, datatype), b"", "input", F, np.float32, 64
    )
    nested = decode_input(
        tensor(values.tolist(), values.shape, datatype), b"", "input", F, np.float32, 64
    )
    np.testing.assert_array_equal(from_binary, values.astype(np.float32))
    np.testing.assert_array_equal(from_json, from_binary)
    np.testing.assert_array_equal(nested, from_binary)
    assert from_binary.dtype == np.float32


@pytest.mark.parametrize(
    ("entry", "binary", "message"),
    [
        (tensor([1, 2, 3, 4, 5, 6, 7, 8], shape=(2, 5)), b"", r"expected shape \[batch, 4\]"),
        (tensor([1.0] * 7), b"", "needs 8 values, 'data' has 7"),
        (tensor([[1, 2, 3, 4], [5, 6, 7]]), b"", "nested 'data' must be 2 arrays of 4"),
        (tensor([1, 2, 3, "4", 5, 6, 7, 8]), b"", "element 3 must be a number"),
        (tensor([1.5] * 8, datatype="INT32"), b"", "element 0 must be an integer"),
        (tensor([300] * 8, datatype="UINT8"), b"", "out of range for UINT8"),
        (tensor([1e39] * 8, datatype="FP64"), b"", "finite numbers"),
        (tensor([1.0] * 8, datatype="BF16"), b"", "datatype 'BF16' is not supported"),
        (tensor(binary_data_size=31), b"\0" * 31, "need 32 bytes"),
        (tensor(binary_data_size=32), b"\0" * 16, "body carries 16 bytes"),
        (tensor([1.0] * 8), b"\0" * 4, "has 'data' but the body carries 4 bytes"),
        ({**tensor([1.0] * 8), "name": "x"}, b"", "the model's input is 'input'"),
    ],
)
def test_bad_inputs_say_what_was_expected(entry: dict, binary: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        decode_input(entry, binary, "input", F, np.dtype(np.float32), 64)


def test_too_many_rows_is_413_before_any_value_is_read() -> None:
    with pytest.raises(PayloadTooLargeError, match="at most 64"):
        decode_input(tensor("not read", shape=(65, F)), b"", "input", F, np.float32, 64)


def test_outputs_encode_as_tritonclient_decodes_them() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    entry, raw = encode_output("probabilities", scores, binary=True)
    assert entry == {
        "name": "probabilities",
        "shape": [2, 3],
        "datatype": "FP32",
        "parameters": {"binary_data_size": 24},
    }
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(2, 3), scores)
    entry, raw = encode_output("probabilities", scores, binary=False)
    assert raw == b"" and list(entry["data"]) == scores.ravel().tolist()

    top = classify(scores, 2, tuple(LABELS))
    entry, raw = encode_output("probabilities", top, binary=True)
    decoded = triton.deserialize_bytes_tensor(raw).reshape(2, 2)
    assert decoded.tolist() == [[b"0.7:1:dog", b"0.2:2:bird"], [b"0.5:0:cat", b"0.25:1:dog"]]
    assert raw == triton.serialize_byte_tensor(top.astype(np.object_)).item()
    assert entry["datatype"] == "BYTES" and entry["parameters"]["binary_data_size"] == len(raw)
    entry, raw = encode_output("probabilities", top, binary=False)
    assert entry["data"] == ["0.7:1:dog", "0.2:2:bird", "0.5:0:cat", "0.25:1:dog"]


def test_classification_breaks_ties_by_index_and_omits_missing_labels() -> None:
    scores = np.array([[0.25, 0.5, 0.25]], dtype=np.float32)
    assert classify(scores, 3, None).tolist() == [["0.5:1", "0.25:0", "0.25:2"]]


def test_body_split_by_the_header_length() -> None:
    header, tail = split_body(b'{"inputs":[]}' + struct.pack("<f", 1.5), "13")
    assert header == b'{"inputs":[]}' and bytes(tail) == struct.pack("<f", 1.5)
    assert split_body(b"{}", None) == (b"{}", memoryview(b""))
    for bad in ("x", "0", "99", "-1"):
        with pytest.raises(BadRequestError, match="Inference-Header-Content-Length"):
            split_body(b"{}", bad)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    path = build_mlp_classifier(tmp_path_factory.mktemp("codec") / "m.onnx")
    return ModelRuntime.load(Path(path), "m", 1)


def test_simple_requests_by_position_and_by_name_give_the_same_rows(runtime) -> None:
    row = [float(i) / 4 for i in range(len(FEATURE_NAMES))]
    by_position, many, top_k = parse_predict_request({"features": row}, runtime, 8)
    assert (many, top_k) == (False, None)
    shuffled = dict(reversed(list(zip(FEATURE_NAMES, row, strict=True))))
    by_name, _, _ = parse_predict_request({"features": shuffled}, runtime, 8)
    np.testing.assert_array_equal(by_name, by_position)
    batch, many, top_k = parse_predict_request({"instances": [row, row], "top_k": 2}, runtime, 8)
    assert (batch.shape, many, top_k) == ((2, len(row)), True, 2)
    answer = predictions(runtime, runtime.probabilities(by_position), None)[0]
    expected = runtime.session.run(["probabilities"], {"input": by_position})[0][0]
    assert answer["class_index"] == int(np.argmax(expected))
    assert answer["label"] == LABELS[int(np.argmax(expected))]
    np.testing.assert_allclose(list(answer["probabilities"].values()), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({}, BadRequestError, "either 'features' or 'instances'"),
        ({"features": [1.0] * 3}, BadRequestError, "expected 8 features, got 3"),
        ({"features": {"f0": 1.0, "zz": 2}}, BadRequestError, "unknown feature names 'zz'"),
        ({"features": [[1.0] * 8]}, BadRequestError, "nested array"),
        ({"features": [1e39] * 8}, BadRequestError, "finite numbers within float32"),
        ({"features": [0.0] * 8, "top_k": 4}, BadRequestError, "top_k must be an integer"),
        ({"instances": [[0.0] * 8] * 9}, PayloadTooLargeError, "at most 8 per request"),
    ],
)
def test_bad_simple_requests(runtime, body: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_predict_request(body, runtime, 8)


COLUMNS = (
    RawColumn("size", "numeric"),
    RawColumn("flag", "boolean"),
    RawColumn("color", "categorical", ("red", "blue"), frozenset({"", "NA"})),
)


def test_raw_rows_become_one_array_per_column() -> None:
    rows = [
        {"size": 2, "flag": True, "color": "red"},
        {"size": None, "flag": "no", "color": None},
        [1.5, 0, "purple"],
    ]
    feeds = feeds_from_rows(rows, COLUMNS, "instances")
    assert feeds["size"].dtype == np.float32 and feeds["size"].shape == (3, 1)
    assert feeds["size"][0, 0] == 2 and np.isnan(feeds["size"][1, 0])
    assert feeds["flag"][:, 0].tolist() == [1.0, 0.0, 0.0]
    assert feeds["color"][:, 0].tolist() == ["red", "", "purple"]
    assert unknown_categories(feeds, COLUMNS) == {"color": 1}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"size": 1, "flag": True}, r"missing fields \['color'\] \(send null"),
        ({"size": 1, "flag": True, "color": "red", "x": 1}, r"unknown fields \['x'\]"),
        ({"size": "big", "flag": True, "color": "red"}, "'size'.* must be a number or null"),
        ({"size": 1, "flag": "maybe", "color": "red"}, "'flag'.* must be true, false or null"),
        ({"size": 1, "flag": True, "color": [1]}, "'color'.* must be a category"),
        ([1, True], "expected 3 values in the order"),
    ],
)
def test_bad_raw_rows_name_the_field(row, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        feeds_from_rows([row], COLUMNS, "features")


@pytest.mark.parametrize("binary", [False, True])
def test_v2_columns_decode_json_and_tritonclient_binary(binary: bool) -> None:
    colors = np.array([["red"], [""], ["purple"]], dtype=object)
    sizes = np.array([[1.0], [np.nan], [3.0]], dtype=np.float32)
    if binary:
        raw_colors = triton.serialize_byte_tensor(colors).item()
        color = {"name": "color", "datatype": "BYTES", "shape": [3, 1],
                 "parameters": {"binary_data_size": len(raw_colors)}}  # fmt: skip
        size = {"name": "size", "datatype": "FP32", "shape": [3, 1],
                "parameters": {"binary_data_size": 12}}  # fmt: skip
        tail = memoryview(raw_colors + sizes.tobytes())
        got_color = decode_column(color, tail, COLUMNS[2], 8)
        got_size = decode_column(size, tail[len(raw_colors) :], COLUMNS[0], 8)
    else:
        color = {
            "name": "color",
            "datatype": "BYTES",
            "shape": [3],
            "data": ["red", None, "purple"],
        }
        size = {"name": "size", "datatype": "FP32", "shape": [3, 1], "data": [[1], [None], [3]]}
        got_color = decode_column(color, memoryview(b""), COLUMNS[2], 8)
        got_size = decode_column(size, memoryview(b""), COLUMNS[0], 8)
    assert got_color[:, 0].tolist() == ["red", "", "purple"]
    np.testing.assert_array_equal(got_size, sizes)
    with pytest.raises(BadRequestError, match="takes BYTES"):
        decode_column({**color, "datatype": "FP32"}, memoryview(b""), COLUMNS[2], 8)
