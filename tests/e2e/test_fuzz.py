"""Schema fuzzing of a real `motionserve serve`: requests generated from its own OpenAPI
document (schemathesis), valid and invalid, with and without an API key. No answer may be a 5xx
or a status the document does not list for that operation, every error has the one error shape,
and every documented response matches its schema.

`make test` runs MOTIONSERVE_FUZZ_CASES (default 200) cases; `make fuzz` runs 1,000.
"""

from __future__ import annotations

import collections
import os
import time

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.conftest import KEYS

FUZZ_CASES = int(os.environ.get("MOTIONSERVE_FUZZ_CASES", "200"))
FUZZ_SEED = int(os.environ.get("MOTIONSERVE_FUZZ_SEED", "19"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# The server is shared with other modules (tests/ordering.py runs the fuzzer last on it); the
# fuzzer acts as a tenant under which no other module submits work, one more guard.
FUZZ_TENANT = "globex"


def _documented(schema: dict, method: str, path: str) -> set[int]:
    return {int(status) for status in schema["paths"][path][method.lower()]["responses"]}


def test_fuzzing_finds_no_5xx_and_no_undocumented_status(server):
    document = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in modes])  # fmt: skip
    statuses: collections.Counter = collections.Counter()
    problems: list[str] = []
    auth = {"X-API-Key": KEYS[FUZZ_TENANT]}
    calls = 0

    @seed(FUZZ_SEED)
    @settings(
        max_examples=FUZZ_CASES,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: every case is recorded, none is repeated
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, anonymous=st.integers(0, 9))
    def fuzz(case, anonymous):
        nonlocal calls
        calls += 1
        headers = {} if anonymous == 0 else auth
        response = case.call(base_url=server.url, headers=headers, timeout=60)
        status = response.status_code
        operation = f"{case.method} {case.path}"
        statuses[(operation, status)] += 1
        where = f"{operation} -> {status} ({case.as_curl_command()[:300]})"
        if status not in _documented(document, case.method, case.path):
            problems.append(f"undocumented status: {where}")
        if status >= 400:
            body = response.json()
            if set(body) != {"error"} or set(body["error"]) != {"code", "message"}:
                problems.append(f"error shape: {where}: {response.text[:200]}")
        if status == 202 and case.method == "POST":
            # e.g. a generated WebP is a one-frame video: cancel it (a job or a preview) at once
            # so the fuzzer's never hold the server's slots (no 503) nor run up its work.
            accepted = response.json()
            kind = "previews" if "preview_id" in accepted else "jobs"
            ident = accepted.get("preview_id") or accepted["job_id"]
            cancelled = httpx.delete(f"{server.url}/v1/{kind}/{ident}", headers=auth, timeout=60)
            assert cancelled.status_code == 200, cancelled.text
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Failure, FailureGroup) as exc:  # one Failure per failed check, or a group
            for failure in getattr(exc, "exceptions", (exc,)):
                problems.append(f"{failure.title}: {where}: {str(failure)[:300]}")

    started = time.monotonic()
    fuzz()
    elapsed = time.monotonic() - started
    by_status = collections.Counter()
    for (_, status), count in statuses.items():
        by_status[status] += count
    summary = (
        f"{calls} cases in {elapsed:.0f} s (seed {FUZZ_SEED}); "
        f"statuses {dict(sorted(by_status.items()))}; "
        f"5xx: {sum(c for s, c in by_status.items() if s >= 500)}; "
        f"problems: {len(problems)}"
    )
    print(summary)
    for line in sorted(statuses.items()):
        print(line)
    assert calls >= FUZZ_CASES * 0.9, summary
    assert len({op for op, _ in statuses}) == len(operations), summary  # every operation ran
    kinds: dict[str, str] = {}  # one example per kind of problem
    for problem in problems:
        kinds.setdefault(problem.split(" (", 1)[0], problem)
    assert not problems, summary + "\n" + "\n".join(kinds.values())


def test_wrong_method_gets_405_with_every_allowed_method(server):
    with server.client("globex") as client:
        response = client.put(f"/v1/jobs/{'0' * 32}")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    allowed = {method.strip() for method in response.headers["allow"].split(",")}
    assert allowed == {"GET", "DELETE"}


def test_a_missing_s3_input_in_an_allowed_bucket_is_a_422_not_a_crash(server, moto_s3):
    body = {"prompt": "x", "input": f"s3://{moto_s3.bucket}/inputs/never-uploaded.mp4"}
    with server.client(FUZZ_TENANT) as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "input_not_found"
