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


def _load_schemathesis_now() -> None:
    """Import what loading a schema and building its strategies needs, at collection.

    schemathesis imports most of itself lazily. Imported late in a long run, after other tests, pytest's
    assertion rewriting of one of those modules failed once on CPython 3.11.7 ("SystemError: AST
    constructor recursion depth mismatch", a CPython bug fixed in later 3.11 releases) and this module
    errored at setup. A one-operation schema loaded here brings those modules in first.
    """
    tiny = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "paths": {"/x": {"post": {"requestBody": {"content": {"multipart/form-data": {"schema": {
                "type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}}}},
                "responses": {"200": {"description": "ok"}}}}}}
    for result in schemathesis.openapi.from_dict(tiny).get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            result.ok().as_strategy(generation_mode=mode)


_load_schemathesis_now()


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
