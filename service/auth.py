"""Optional bearer-token authentication (`--token-file FILE` or `BNSERVE_TOKEN_FILE`).

The file holds one token per line (several allow rotation; blank lines and `#` comments are
skipped). A request must send `Authorization: Bearer <token>`; tokens are compared with
`hmac.compare_digest` (constant time, so the answer time says nothing about how much of a guess
was right), each candidate against every token. Which paths stay open (liveness and readiness:
probes carry no token; `/metrics` when `--public-metrics` is given) is declared in the route
table (service/api.py, `Route.access`); the gRPC methods take theirs from the same table
(service/grpc_api.py). gRPC clients send the token as `authorization: Bearer <token>` metadata.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from bnserve.errors import UsageError

CHALLENGE = 'Bearer realm="bnserve"'
INVALID_CHALLENGE = 'Bearer realm="bnserve", error="invalid_token"'


def read_tokens(path: str | Path) -> tuple[bytes, ...]:
    """The tokens in `path`; a missing or empty file is a usage error (never an open server)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {path}: cannot read it: {exc}") from None
    tokens = tuple(
        line.strip().encode()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise UsageError(f"--token-file {path}: no token in it (one token per line)")
    for token in tokens:
        if len(token) < 8 or any(c in token for c in b" \t"):
            raise UsageError(
                f"--token-file {path}: tokens must be at least 8 characters without spaces"
            )
    return tokens


class BearerAuth:
    """Checks the Authorization header of a WSGI environ against the configured tokens."""

    def __init__(self, tokens: tuple[bytes, ...], open_paths: frozenset[str]) -> None:
        self.tokens = tokens
        self.open_paths = open_paths

    def check(self, environ: dict) -> str | None:
        """None when allowed, else the WWW-Authenticate challenge to answer 401 with."""
        if environ.get("PATH_INFO") in self.open_paths:
            return None
        return self.challenge(environ.get("HTTP_AUTHORIZATION"))

    def challenge(self, header: str | None) -> str | None:
        """None when the `Authorization` value (HTTP header or gRPC `authorization` metadata)
        carries a valid bearer token, else the challenge to answer with."""
        if not header:
            return CHALLENGE
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return CHALLENGE
        candidate = given.strip().encode("latin-1", "replace")
        ok = False
        for token in self.tokens:  # no early exit: every token is compared
            ok |= hmac.compare_digest(candidate, token)
        return None if ok else INVALID_CHALLENGE
