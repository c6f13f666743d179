"""The OpenAPI document tells the truth about errors (serve/api.py, serve/schemas.py).

In process over ASGI; the real server is fuzzed against the same document in
tests/e2e/test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.errors import InvalidSettingError
from deployments.motion import parse_style
from serve.api import create_api
from serve.auth import Authenticator, hash_api_key
from serve.config import TenantKey
from serve.schemas import PUBLIC_PRESETS, STYLE_NAMES, STYLE_PATTERN

ERROR_REF = "#/components/schemas/ErrorResponse"


class NoService:
    """Every route that reaches the service fails the test: these requests must not."""

    def __getattr__(self, name):
        raise AssertionError(f"the service was called ({name})")


def api(keys: bool = False):
    tenants = [TenantKey(tenant="acme", key_sha256=hash_api_key("k"))] if keys else []
    return create_api(NoService(), Authenticator(tenants))


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_every_error_response_is_documented_in_the_one_error_shape():
    document = api().openapi()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    expected = {
        ("post", "/v1/jobs"): {"202", "400", "401", "403", "413", "415", "422", "503"},
        ("get", "/v1/jobs/{job_id}"): {"200", "401", "404"},
        ("get", "/v1/jobs/{job_id}/result"): {"200", "401", "404", "409"},
        ("delete", "/v1/jobs/{job_id}"): {"200", "202", "401", "404"},
        ("post", "/v1/estimate"): {"200", "400", "401", "422"},
        ("post", "/v1/previews"): {"202", "400", "401", "403", "413", "415", "422", "503"},
        ("get", "/v1/previews/{preview_id}"): {"200", "401", "404"},
        ("get", "/v1/previews/{preview_id}/video"): {"200", "401", "404", "409"},
        ("get", "/v1/previews/{preview_id}/anchor"): {"200", "401", "404", "409"},
        ("delete", "/v1/previews/{preview_id}"): {"200", "202", "401", "404"},
        ("get", "/readyz"): {"200", "503"},
        ("get", "/healthz"): {"200"},
    }
    found = {
        (method, path): set(operation["responses"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert found == expected
    for (method, path), statuses in found.items():
        for status in statuses:
            response = document["paths"][path][method]["responses"][status]
            if int(status) >= 400 and path.startswith("/v1/"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (path, status)
    for path in ("/v1/jobs", "/v1/previews"):
        retry = document["paths"][path]["post"]["responses"]["503"]["headers"]
        assert "Retry-After" in retry


def test_preview_takes_the_same_documented_body_as_a_job():
    paths = api().openapi()["paths"]
    body = paths["/v1/previews"]["post"]["requestBody"]
    assert body == paths["/v1/jobs"]["post"]["requestBody"]
    video = paths["/v1/previews/{preview_id}/video"]["get"]["responses"]["200"]["content"]
    assert "video/mp4" in video
    anchor = paths["/v1/previews/{preview_id}/anchor"]["get"]["responses"]["200"]["content"]
    assert "image/png" in anchor


def test_preview_refusals_before_the_service_match_the_jobs():
    app = api(keys=True)
    headers = {"X-API-Key": "k"}
    for path in ("/v1/jobs", "/v1/previews"):
        assert call(app, "POST", path, json={"prompt": "x"}).status_code == 401
        response = call(app, "POST", path, content=b"raw", headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (
            415, "unsupported_media_type")  # fmt: skip
    response = call(app, "PUT", "/v1/previews/" + "0" * 32, headers=headers)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}


def test_submit_documents_both_bodies_it_reads_by_hand():
    document = api().openapi()
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    multipart = body["multipart/form-data"]["schema"]
    assert multipart["required"] == ["video"]
    assert multipart["properties"]["video"]["format"] == "binary"
    s3 = document["components"]["schemas"]["S3JobRequest"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/S3JobRequest"}
    assert "input" in s3["required"] and "prompt" in s3["required"]
    # every $ref in the document resolves
    text = str(document)
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in document["components"]["schemas"], name


def test_preset_and_styles_are_enumerated():
    request = api().openapi()["components"]["schemas"]["JobRequest"]["properties"]
    (enum,) = [option for option in request["preset"]["anyOf"] if "enum" in option]
    assert enum["enum"] == list(PUBLIC_PRESETS) == ["draft", "standard", "high", "turbo"]
    assert request["styles"]["items"]["pattern"] == STYLE_PATTERN
    assert set(STYLE_NAMES) == {"smooth", "exaggerate", "mirror", "stabilize", "retime"}


@pytest.mark.parametrize(
    "style",
    ["smooth", "smooth=savgol", "smooth:method=savgol,window=9", "exaggerate=1.3", "mirror",
     "stabilize=2", "retime=0.5", " RETIME = 2 ", "Smooth : method=savgol", "exaggerate=\n1"],
)  # fmt: skip
def test_the_style_pattern_admits_the_documented_syntax(style):
    parse_style(style)
    assert re.match(STYLE_PATTERN, style)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.text(max_size=30),
        st.builds(
            lambda pad, name, sep, rest: pad + name + pad + sep + rest,
            st.sampled_from([" ", "", "\t"]),
            st.sampled_from(STYLE_NAMES).map(lambda n: n.upper() if len(n) % 2 else n),
            st.sampled_from(["", "=", ":", " = ", ":window="]),
            st.text(alphabet="0123456789.,=:abcdegilmnostvw ", max_size=12),
        ),
    )
)
def test_the_style_pattern_never_rejects_a_style_the_service_accepts(text):
    try:
        parse_style(text)
    except InvalidSettingError:
        return
    assert re.match(STYLE_PATTERN, text), text


def test_wrong_method_answers_405_with_allow_in_the_error_shape():
    response = call(api(), "PUT", "/v1/jobs")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = call(api(), "POST", "/v1/jobs/" + "0" * 32)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}


def test_validation_errors_use_the_error_shape():
    response = call(api(), "POST", "/v1/estimate", json={"duration_s": -1})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "duration_s" in error["message"]
    response = call(api(), "POST", "/v1/estimate", content=b"{", headers={"content-type": "x"})
    assert response.status_code == 422 and "error" in response.json()


def test_estimate_refuses_the_naive_preset_like_submit():
    body = {"duration_s": 2, "width": 64, "height": 64, "request": {"prompt": "x"}}
    for preset in ("naive", "ultra"):
        body["request"]["preset"] = preset
        response = call(api(), "POST", "/v1/estimate", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_preset"


def test_submit_refusals_before_the_service_use_documented_codes():
    app = api(keys=True)
    response = call(app, "POST", "/v1/jobs", json={"prompt": "x"})
    assert response.status_code == 401
    headers = {"X-API-Key": "k"}
    response = call(app, "POST", "/v1/jobs", content=b"raw", headers=headers)
    assert response.status_code == 415
    response = call(app, "POST", "/v1/jobs", content=b"{", headers={**headers,
                    "content-type": "application/json"})  # fmt: skip
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_json")
