"""The generated OpenAPI document is valid OpenAPI and describes every body (issue 16, item 5).

Validated with a real OpenAPI validator (openapi-spec-validator: the document against the
OpenAPI 3.1 schema, every `$ref` resolved); real responses are checked against the schemas the
document gives them (openapi-schema-validator). In process over ASGI.
"""

from __future__ import annotations

import asyncio

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from serve.api import create_api
from serve.auth import Authenticator
from serve.config import AppArgs
from tests.unit.test_bounds import api_service, post_all

SCHEMAS = "#/components/schemas/"
ERROR_REF = {"$ref": SCHEMAS + "ErrorResponse"}
POSTS = {
    "/v1/jobs": {"multipart/form-data", "application/json"},
    "/v1/previews": {"multipart/form-data", "application/json"},
    "/v1/estimate": {"application/json"},
}


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict:
    service = api_service(tmp_path_factory.mktemp("openapi"), AppArgs())
    return create_api(service, Authenticator([])).openapi()


def test_the_document_is_valid_openapi(document):
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises OpenAPIValidationError with the failing path


def test_the_validator_rejects_a_broken_document(document):
    """The check above can fail: a dangling reference and a wrong type are caught."""
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    broken = {**document, "paths": {"/x": {"get": {"responses": {"200": {"description": 1}}}}}}
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_each_post_documents_its_request_bodies(document):
    paths = document["paths"]
    for path, content_types in POSTS.items():
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True, path
        assert set(body["content"]) == content_types, path
    for path in ("/v1/jobs", "/v1/previews"):
        content = paths[path]["post"]["requestBody"]["content"]
        multipart = content["multipart/form-data"]
        properties = multipart["schema"]["properties"]
        assert "video" in multipart["schema"]["required"]
        assert properties["video"] == {**properties["video"], "type": "string", "format": "binary"}
        assert properties["request"]["$ref"] == SCHEMAS + "JobRequest"
        assert multipart["encoding"]["request"]["contentType"] == "application/json"
        for name, prop in properties.items():  # other files (a reference image) are optional
            if name != "video" and prop.get("format") == "binary":
                assert name not in multipart["schema"]["required"], name
        assert content["application/json"]["schema"] == {"$ref": SCHEMAS + "S3JobRequest"}
        s3 = document["components"]["schemas"]["S3JobRequest"]
        assert {"input", "prompt"} <= set(s3["required"])
    estimate = paths["/v1/estimate"]["post"]["requestBody"]["content"]["application/json"]
    assert estimate["schema"] == {"$ref": SCHEMAS + "EstimateRequest"}


def test_the_coherence_switches_are_documented(document):
    schemas = document["components"]["schemas"]
    field = schemas["JobRequest"]["properties"]["coherence"]
    assert {"$ref": SCHEMAS + "Coherence"} in field["anyOf"] and field["description"]
    coherence = schemas["Coherence"]
    assert coherence["additionalProperties"] is False and coherence["description"]
    assert set(coherence["properties"]) == {"anchor", "seamless", "motion_module"}
    for name, prop in coherence["properties"].items():
        assert {"type": "boolean"} in prop["anyOf"] and prop.get("default") is None, name
        assert "preset" in prop["description"], name
    # S3 bodies and estimates carry the same request model
    assert "coherence" in schemas["S3JobRequest"]["properties"]


def test_every_response_references_a_model_or_the_error_schema(document):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                where = (method, path, status)
                content = response.get("content")
                assert content, where
                binary = {"video/mp4", "image/png"} & set(content)
                if binary:
                    (kind,) = binary
                    assert content[kind]["schema"] == {"type": "string", "format": "binary"}
                    continue
                schema = content["application/json"]["schema"]
                if int(status) >= 400 and path.startswith("/v1/"):
                    assert schema == ERROR_REF, where
                else:
                    assert set(schema) == {"$ref"}, where  # a named model, not a bare object
                    assert (
                        schema["$ref"].removeprefix(SCHEMAS) in document["components"]["schemas"]
                    ), where


def _validator(document: dict, ref: str) -> OAS31Validator:
    """A validator for the schema at `ref`, its own references resolved in the document."""
    return OAS31Validator({"$ref": ref, "components": document["components"]})


def test_real_responses_match_their_documented_schemas(tmp_path, document):
    base = {"width": 640, "height": 360, "duration_s": 10, "request": {"prompt": "x"}}
    ok, refused = asyncio.run(post_all(tmp_path, [base, {**base, "duration_s": 601}]))
    assert ok.status_code == 200 and refused.status_code == 422
    estimate = _validator(document, "#/components/schemas/EstimateResponse")
    estimate.validate(ok.json())
    assert ok.json()["plan_explained"] and ok.json()["ratio"] > 1
    _validator(document, "#/components/schemas/ErrorResponse").validate(refused.json())
    with pytest.raises(Exception, match="required"):  # the schema is strict enough to fail
        estimate.validate({key: v for key, v in ok.json().items() if key != "plan"})
