"""Schemathesis over the service's OpenAPI schema: no generated request makes it answer 500, and every
answer is one the schema declares (status, content type, body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

from service import ServiceSettings, create_app
from service_support import copy_index, session_index

EXAMPLES = 15  # per operation and mode: the whole run stays well under a minute


@pytest.fixture(scope="module")
def api_schema(shared_data, tmp_path_factory):
    index = copy_index(session_index(tmp_path_factory, shared_data), tmp_path_factory.mktemp("schema") / "index")
    app = create_app(ServiceSettings(index=index, device="cpu", load_in_background=False, api_key="key",
                                     max_upload_bytes=200_000, rerank_k=5))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_server_errors(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /search", "POST /index/images", "GET /images/{image_id}", "GET /index"} <= labels, labels
    exercised = set()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            case.call_and_validate(checks=CHECKS, headers={"X-API-Key": "key"})

        try:
            check()
            exercised.add(operation.label)
        except Unsatisfiable:  # no parameters to get wrong (e.g. GET /healthz): nothing to send
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert {"POST /search", "POST /index/images", "DELETE /index/images/{image_id}"} <= exercised, exercised
