"""Open Inference Protocol tensors: decoding inputs and encoding outputs, JSON or binary.

Binary tensor data extension: the body is a JSON header followed by raw little-endian tensor
bytes; an input sent that way has `"parameters": {"binary_data_size": N}` and no `data`. BYTES
elements are each prefixed by their 4-byte little-endian length. Classification extension: an
output requested with `"classification": k` becomes a BYTES tensor `[batch, k]` of
`"score:index"` (or `"score:index:label"` when the model has labels), best first.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from bnserve.service.body import json_type
from bnserve.service.errors import BadRequestError, PayloadTooLargeError

# Protocol datatype -> little-endian numpy dtype (BYTES and BOOL are not model inputs here).
NUMERIC_DATATYPES: dict[str, np.dtype] = {
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
}
_NUMPY_TO_DATATYPE = {dtype.newbyteorder("="): name for name, dtype in NUMERIC_DATATYPES.items()}
_NUMPY_TO_DATATYPE[np.dtype(np.bool_)] = "BOOL"  # an output only (one byte per element)
_SUPPORTED = ", ".join(NUMERIC_DATATYPES)
# Most keys in one `parameters` object: every repeated or open-ended field of a request is
# bounded, so no request makes a worker do (or allocate) more than its rows ask for.
MAX_PARAMETERS = 32


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype (FP32 for float32, ...)."""
    return _NUMPY_TO_DATATYPE.get(np.dtype(dtype).newbyteorder("="), "BYTES")


def decode_input(
    tensor: Any,
    binary: bytes | memoryview,
    input_name: str,
    n_features: int,
    dtype: np.dtype,
    max_batch: int,
) -> np.ndarray:
    """Check one request input against the model's `[batch, F]` input and return it as `dtype`.

    `binary` is the part of the body after the JSON header (empty when there is none).
    """
    if not isinstance(tensor, dict):
        raise BadRequestError(f"each input must be a JSON object, got a JSON {json_type(tensor)}")
    name = tensor.get("name")
    if name != input_name:
        raise BadRequestError(f"unexpected input {name!r}: the model's input is {input_name!r}")
    where = f"input {name!r}"
    datatype = tensor.get("datatype")
    source_dtype = NUMERIC_DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if source_dtype is None:
        raise BadRequestError(f"{where}: datatype {datatype!r} is not supported; use {_SUPPORTED}")
    shape = _check_shape(tensor.get("shape"), where, n_features, max_batch)
    count = shape[0] * shape[1]
    parameters = check_parameters(tensor.get("parameters"), f"{where}: 'parameters'")
    size = parameters.get("binary_data_size")
    if size is not None:
        values = _from_binary(size, binary, source_dtype, count, where)
    else:
        if len(binary):
            raise BadRequestError(
                f"{where} has 'data' but the body carries {len(binary)} bytes of binary data"
            )
        values = _from_json(tensor.get("data"), source_dtype, shape, where)
    with np.errstate(over="ignore", invalid="ignore"):
        x = values.astype(dtype).reshape(shape)
    if not np.isfinite(x).all():
        raise BadRequestError(
            f"{where}: values must be finite numbers within {datatype} range and the "
            f"model's {np.dtype(dtype)} input range"
        )
    return x


def check_parameters(value: Any, where: str) -> dict[str, Any]:
    """A `parameters` object (absent = empty) of at most MAX_PARAMETERS keys."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequestError(f"{where} must be a JSON object")
    if len(value) > MAX_PARAMETERS:
        raise BadRequestError(f"{where} has {len(value)} keys, at most {MAX_PARAMETERS} allowed")
    return value


def _check_shape(shape: Any, where: str, n_features: int, max_batch: int) -> tuple[int, int]:
    valid = (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(d) is int and d >= 0 for d in shape)
    )
    if not valid or shape[1] != n_features or shape[0] < 1:
        raise BadRequestError(f"{where}: expected shape [batch, {n_features}], got {shape!r}")
    if shape[0] > max_batch:
        raise PayloadTooLargeError(
            f"{where}: too many rows: batch of {shape[0]}, at most {max_batch} per request"
        )
    return shape[0], shape[1]


def _from_binary(
    size: Any, binary: bytes | memoryview, dtype: np.dtype, count: int, where: str
) -> np.ndarray:
    expected = count * dtype.itemsize
    if type(size) is not int or size != expected:
        raise BadRequestError(
            f"{where}: binary_data_size is {size!r}, but its shape and datatype need {expected} bytes"
        )
    if len(binary) != size:
        raise BadRequestError(
            f"{where}: binary_data_size is {size} but the body carries {len(binary)} bytes "
            "after the JSON header (check Inference-Header-Content-Length)"
        )
    return np.frombuffer(binary, dtype=dtype, count=count)


def _from_json(data: Any, dtype: np.dtype, shape: tuple[int, int], where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequestError(
            f"{where}: 'data' must be an array of numbers (or use binary_data_size), "
            f"got a JSON {json_type(data)}"
        )
    flat = _flatten(data, shape, where)
    integer = dtype.kind in "iu"
    allowed = (int,) if integer else (int, float)
    for i, value in enumerate(flat):
        if type(value) not in allowed:
            kind = "an integer" if integer else "a number"
            raise BadRequestError(
                f"{where}: element {i} must be {kind} for datatype {datatype_of(dtype)}, "
                f"got a JSON {json_type(value)} ({value!r})"
            )
    count = shape[0] * shape[1]
    if len(flat) != count:
        raise BadRequestError(f"{where}: its shape needs {count} values, 'data' has {len(flat)}")
    if integer:
        info = np.iinfo(dtype)
        if any(v < info.min or v > info.max for v in flat):
            raise BadRequestError(f"{where}: values out of range for {datatype_of(dtype)}")
        return np.array(flat, dtype=dtype)
    with np.errstate(over="ignore"):
        return np.array(flat, dtype=dtype)


def _flatten(data: list[Any], shape: tuple[int, int], where: str) -> list[Any]:
    """Row-major values from flat `data`, or from nested `data` that has exactly the tensor's
    shape (rows of equal length: a ragged row would silently shift values into the next row)."""
    if not any(type(item) is list for item in data):
        return data
    rows, columns = shape
    if len(data) != rows or any(type(row) is not list or len(row) != columns for row in data):
        raise BadRequestError(
            f"{where}: nested 'data' must be {rows} arrays of {columns} values each "
            f"(its shape is [{rows}, {columns}]), or one flat array in row-major order"
        )
    return [value for row in data for value in row]


def classify(scores: np.ndarray, k: int, labels: tuple | None) -> np.ndarray:
    """The k best classes per row as `"score:index[:label]"` strings, best first (ties by index)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = []
    for row_scores, row_order in zip(scores, order, strict=True):
        for j in row_order.tolist():
            text = f"{row_scores[j]!s}:{j}"  # str(): the shortest float32 form
            rows.append(f"{text}:{labels[j]}" if labels is not None else text)
    return np.array(rows, dtype=object).reshape(scores.shape[0], k)


def encode_output(name: str, array: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes]:
    """(the output's JSON entry, its binary bytes or b"") for one result tensor."""
    entry: dict[str, Any] = {"name": name, "shape": list(array.shape)}
    if array.dtype == object:
        entry["datatype"] = "BYTES"
        encoded = [str(s).encode() for s in array.ravel()]
        if binary:
            raw = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
            entry["parameters"] = {"binary_data_size": len(raw)}
            return entry, raw
        entry["data"] = [e.decode() for e in encoded]
        return entry, b""
    entry["datatype"] = datatype_of(array.dtype)
    if binary:
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    flat = np.ascontiguousarray(array).ravel()
    # orjson writes float32/float64 arrays directly, in their shortest round-tripping form.
    entry["data"] = flat if flat.dtype in (np.float32, np.float64) else flat.tolist()
    return entry, b""
