"""Reading request bodies: size limit, optional compression, JSON parsing.

The body is read from the WSGI input whatever the Content-Type says (`tritonclient` sends none,
and Flask's `get_json()` would answer 415). JSON is parsed with orjson, which follows the standard:
`NaN` and `Infinity` (accepted by Python's json module) are rejected, as are numbers that overflow.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

from service.errors import BadRequestError, PayloadTooLargeError

# How much of an over-limit body is read and thrown away before answering 413: reading it lets
# the client receive the answer instead of a connection reset; beyond this the server stops.
_DRAIN_LIMIT = 8 * 1024 * 1024
_CHUNK = 64 * 1024


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The raw request body, decompressed when Content-Encoding is gzip or deflate."""
    stream = environ["wsgi.input"]
    raw_length = environ.get("CONTENT_LENGTH")
    if raw_length:
        try:
            length = int(raw_length)
        except ValueError:
            raise BadRequestError(f"invalid Content-Length {raw_length!r}") from None
        if length > limit:
            _drain(stream, min(length, _DRAIN_LIMIT))
            raise PayloadTooLargeError(f"request body is {length} bytes, the limit is {limit}")
        body = stream.read(length) if length > 0 else b""
    elif (
        environ.get("wsgi.input_terminated")
        or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    ):
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
    else:
        body = b""
    encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    return _decompress(body, encoding, limit)


def _drain(stream: Any, length: int) -> None:
    remaining = length
    while remaining > 0:
        chunk = stream.read(min(_CHUNK, remaining))
        if not chunk:
            return
        remaining -= len(chunk)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding == "gzip":
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decompressor = zlib.decompressobj()
    else:
        raise BadRequestError(
            f"unsupported Content-Encoding {encoding!r} (expected gzip, deflate or none)"
        )
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequestError(f"body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLargeError(f"decompressed request body is over the limit of {limit} bytes")
    return data


def parse_json(body: bytes, example: str) -> Any:
    """Parse a JSON document; the error says what was expected (`example`) and what went wrong."""
    if not body.strip():
        raise BadRequestError(f"empty request body: expected JSON like {example}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        hint = ""
        if b"NaN" in body or b"Infinity" in body:
            hint = " (NaN and Infinity are not valid JSON numbers; send finite numbers)"
        raise BadRequestError(f"invalid JSON: {exc}{hint}") from None


def parse_json_object(body: bytes, example: str) -> dict[str, Any]:
    """Parse a JSON body that must be an object."""
    document = parse_json(body, example)
    if not isinstance(document, dict):
        raise BadRequestError(
            f"expected a JSON object like {example}, got a JSON {json_type(document)}"
        )
    return document


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def dumps(document: Any) -> bytes:
    """Serialize a response (numpy arrays and scalars included)."""
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
