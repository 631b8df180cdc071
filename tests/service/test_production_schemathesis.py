"""schemathesis against /openapi.json on the live server (the repository served by 2 workers):
seeded generated requests on every operation, no 5xx, every status, content type and body
matching the document."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.support import LiveServer

MIN_REQUESTS = 2000
EXAMPLES_PER_OPERATION = 100
CALLS: list[int] = []
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="session")
def api_schema(server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@seed(20240501)
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_matches_its_openapi_document(case: schemathesis.Case) -> None:
    CALLS.append(1)
    case.call_and_validate(checks=CHECKS, timeout=10)


@pytest.mark.slow
def test_enough_requests_were_generated() -> None:
    """Runs after the generated tests (same module, file order)."""
    if not CALLS:
        pytest.skip("the generated tests were deselected")
    print(f"schemathesis sent {len(CALLS)} requests")
    assert len(CALLS) >= MIN_REQUESTS
