"""Reading request bodies: size limit, optional compression, JSON parsing.

The body is read from the WSGI input whatever the Content-Type says (`tritonclient` sends none,
and Flask's `get_json()` would answer 415). JSON is parsed with orjson, which follows the standard:
`NaN` and `Infinity` (accepted by Python's json module) are rejected, as are numbers that overflow.
"""

from __future__ import annotations

import contextlib
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from gunicorn.http.errors import NoMoreData, ParseException

from bnserve.service.errors import BadRequestError, PayloadTooLargeError, RequestTimeoutError

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
        if len(body) < length:
            raise BadRequestError(
                f"request body ended after {len(body)} of the {length} bytes its "
                "Content-Length announced"
            )
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


class _Deadline(Exception):
    """Raised inside a read by gevent's timer when the body deadline passes."""


class TimedInput:
    """`wsgi.input` with a deadline for the whole body, and HTTP framing errors as 400s.

    gunicorn reads the body lazily, inside the app, so a client that announces more bytes than
    it sends (or drips them) would hold the worker's slot without end, and a malformed chunk size
    would surface as a 500. Under gevent the deadline is a gevent timer around each read (a true
    total deadline); under sync and gthread workers it is the socket timeout, set to the time
    left before each read. Either way a late body is a 408 and a malformed one a 400, and the
    socket's read side is shut so the connection closes after the answer: what is left of that
    body must not be parsed as the next request.
    """

    def __init__(self, stream: Any, sock: Any, deadline: float, cooperative: bool) -> None:
        self.stream = stream
        self.sock = sock
        self.deadline = deadline
        self.cooperative = cooperative

    def read(self, size: int = -1) -> bytes:
        with self._guard() as remaining:
            if not self.cooperative:
                return self.stream.read(size)
            import gevent

            with gevent.Timeout(remaining, _Deadline):
                return self.stream.read(size)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[float]:
        remaining = self.deadline - time.monotonic()
        timed_socket = not self.cooperative and self.sock is not None
        previous = self.sock.gettimeout() if timed_socket else None
        try:
            if remaining <= 0:
                raise _Deadline
            if timed_socket:
                self.sock.settimeout(remaining)
            yield remaining
        except (_Deadline, TimeoutError):
            self._close_input()
            raise RequestTimeoutError(
                "the request body did not arrive in time (or was shorter than its "
                "Content-Length); the connection is closed"
            ) from None
        except NoMoreData:
            self._close_input()
            raise BadRequestError(
                "the connection ended in the middle of the request body"
            ) from None
        except ParseException as exc:
            self._close_input()
            raise BadRequestError(f"malformed request body framing: {exc}") from None
        finally:
            if timed_socket:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(previous)

    def _close_input(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)

    def readline(self, size: int = -1) -> bytes:
        with self._guard():
            return self.stream.readline(size)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.stream)


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


@dataclass(frozen=True)
class JsonBudget:
    """How much JSON one request may hold, checked by counting bytes before it is parsed.

    Parsing is where a small body becomes a large worker: each `[]` or `{}` costs 56+ bytes of
    Python objects for 2-3 bytes of JSON (16 MiB of them: 470 MB), each short number 32 bytes
    for 4 (16 MiB: 224 MB). So arrays/objects and commas are counted first (a byte count runs
    at gigabytes per second) and a body holding more than a request of `rows` rows of `values`
    numbers needs is refused before it is parsed. Brackets and commas inside strings count too:
    a safe overcount.
    """

    containers: int = 1024
    separators: int = 4096

    @classmethod
    def for_rows(cls, rows: int, features: int) -> JsonBudget:
        """One array or object per row (twice over), one comma per value (twice over), plus
        room for the envelope, parameters and outputs."""
        return cls(2 * rows + 1024, 2 * rows * features + 4096)


def parse_json(body: bytes, example: str, budget: JsonBudget = JsonBudget()) -> Any:
    """Parse a JSON document; the error says what was expected (`example`) and what went wrong."""
    if not body.strip():
        raise BadRequestError(f"empty request body: expected JSON like {example}")
    containers = body.count(b"[") + body.count(b"{")
    separators = body.count(b",")
    if containers > budget.containers or separators > budget.separators:
        raise BadRequestError(
            f"the JSON body holds {containers} arrays/objects and {separators} values; a request "
            f"of this server holds at most {budget.containers} and {budget.separators} "
            f"(--max-batch rows of the model's features): expected JSON like {example}"
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        hint = ""
        if b"NaN" in body or b"Infinity" in body:
            hint = " (NaN and Infinity are not valid JSON numbers; send finite numbers)"
        raise BadRequestError(f"invalid JSON: {exc}{hint}") from None


def parse_json_object(
    body: bytes, example: str, budget: JsonBudget = JsonBudget()
) -> dict[str, Any]:
    """Parse a JSON body that must be an object, within `budget`."""
    document = parse_json(body, example, budget)
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
