"""A bounded, derandomized schemathesis run over the service's own /openapi.json, against the real service
(Postgres, the reference backend) over HTTP: whatever the schema allows (positive cases) or nearly allows
(negative cases) gets no 5xx, and every error comes in OpenAI's envelope with a status, content type,
headers and body the schema documents for the operation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.store.migrate import upgrade
from tests.conftest import Service, start_service

MODEL = "ref-chatml"
# Per operation and generation mode: with 31 operations, several hundred requests in all.
EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(new_postgres_database: Any, reference_backend: Any) -> Iterator[Service]:
    """A service on a database of its own: generated admin calls (an invalidation of everything, a
    retention pass, new tenants) must not reach the other tests' data."""
    url = new_postgres_database()
    upgrade(url)
    service = start_service(url, reference_backend.url, backend_mode="cache_ref")
    yield service
    service.server.stop()


@pytest.fixture(scope="module")
def served_schema(fuzzed: Service) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    loaded.config.update(base_url=fuzzed.url)
    return loaded


def _operations(schema: schemathesis.BaseSchema, mode: schemathesis.GenerationMode) -> list[Any]:
    """Every operation; for negative cases, those with a parameter or a body to get wrong."""
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the schema itself must be valid
        operations.append(result.ok())
    if mode is schemathesis.GenerationMode.NEGATIVE:
        # A path parameter is any string: only a body or a query can be wrong.
        operations = [op for op in operations if list(op.query) or list(op.body)]
    return operations


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors_and_every_error_in_the_envelope(
    served_schema: schemathesis.BaseSchema, fuzzed: Service, mode: schemathesis.GenerationMode
) -> None:
    operations = _operations(served_schema, mode)
    user, admin = ({"authorization": f"Bearer {key}"} for key in (fuzzed.api_key, fuzzed.admin_key))
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case[Any]) -> None:
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                # A model the backend serves, so that generated turns reach it and get stored.
                case.body["model"] = MODEL
            headers = admin if case.operation.path.startswith("/admin/") else user
            response = case.call_and_validate(checks=CHECKS, headers=headers)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"}, body
                assert set(body["error"]) == {"message", "type", "param", "code"}, body

        run()


def test_every_operation_documents_its_errors_in_the_envelope(service: Service) -> None:
    document = service.http().get("/openapi.json").json()
    envelope = {"$ref": "#/components/schemas/ErrorBody"}
    assert set(document["components"]["schemas"]["ErrorBody"]["properties"]) == {"error"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if path.startswith("/admin/"):
                assert {"400", "401", "403", "500", "503"} <= set(responses), (method, path)
            if not path.startswith("/v1/"):
                continue
            expected = {"400", "401", "500", "503"}
            if method == "post" and "/cancel" not in path:
                expected.add("413")
            if "{" in path:
                expected.add("404")
            if path in ("/v1/responses", "/v1/responses/compact"):
                expected |= {"502", "504"}
            assert expected <= set(responses), (method, path, sorted(responses))
            for status in (status for status in responses if status >= "400"):
                assert responses[status]["content"]["application/json"]["schema"] == envelope
            assert "Retry-After" in responses["503"]["headers"]
    assert "409" in document["paths"]["/v1/responses/{response_id}/cancel"]["post"]["responses"]
