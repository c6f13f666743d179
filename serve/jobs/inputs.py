"""Which inputs by reference a job may name: s3:// URIs in the configured buckets only."""

from __future__ import annotations

from deployments.errors import InputError, InvalidSettingError
from serve.storage import parse_s3_uri


class ForbiddenInputError(InputError):
    """An s3:// input outside the configured buckets: we never fetch arbitrary locations."""

    code = "forbidden_input"
    http_status = 403


def check_input_uri(uri: str, allowed_buckets: list[str]) -> str:
    """Accept only s3:// URIs in the allowed buckets (no http(s), no file paths)."""
    if not uri.startswith("s3://"):
        raise ForbiddenInputError("inputs by reference must be s3:// URIs in an allowed bucket")
    try:
        bucket, key = parse_s3_uri(uri)
    except ValueError as exc:
        raise InvalidSettingError(f"malformed s3 URI: {exc}") from None
    if bucket not in allowed_buckets or not key:
        raise ForbiddenInputError(f"bucket {bucket!r} is not an allowed input bucket")
    return uri
