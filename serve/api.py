"""HTTP API (FastAPI): routes only; the bodies are in serve/schemas.py, the work in `JobService`.

Every error is JSON ``{"error": {"code", "message"}}`` (`ErrorResponse`), and each operation's
OpenAPI lists every status it can send (tests/e2e/test_fuzz.py holds the server to that).
Another tenant's job answers 404, the same as a job that does not exist, so ids reveal nothing.

The web page (serve/web/: plain HTML, CSS and JS shipped in the package) is served at `/` and
`/static/...`, outside the OpenAPI document and without an API key: it holds no data, and it
calls the public `/v1` API like any client, sending the key the user types in.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from deployments.errors import InputError
from serve.auth import Authenticator
from serve.cost import EstimateResponse
from serve.jobs import JobManifest, JobNotFound, Overloaded
from serve.jobs.store import anchor_image_key
from serve.schemas import (
    PUBLIC_PRESETS,
    ErrorResponse,
    EstimateRequest,
    Health,
    JobAccepted,
    JobRequest,
    JobState,
    JobStatus,
    PreviewAccepted,
    PreviewStatus,
    Readiness,
    S3JobRequest,
    motion_style_schemas,
)
from serve.storage import ObjectNotFound

API_VERSION = "v1"
WEB_DIR = Path(__file__).parent / "web"
# The page loads nothing from elsewhere (it must work offline) and runs no inline script; videos
# play from blob: URLs (fetched with the API key, which a <video src> cannot send).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' "
    "blob: data:; object-src 'none'; base-uri 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _status(manifest: JobManifest, cancel_requested: bool = False) -> JobStatus:
    done = manifest.state == JobState.DONE
    return JobStatus(
        job_id=manifest.job_id,
        state=manifest.state,
        created_at=manifest.created_at,
        updated_at=manifest.updated_at,
        progress=manifest.progress,
        attempts=manifest.attempts,
        cancel_requested=cancel_requested and not manifest.terminal,
        error=manifest.error.model_dump() if manifest.error else None,
        report=manifest.report,
        result_url=f"/{API_VERSION}/jobs/{manifest.job_id}/result" if done else None,
        checkpointed_chunks=sorted(int(chunk) for chunk in manifest.checkpoints),
        ledger=manifest.ledger,
    )


def _preview_status(manifest: JobManifest, cancel_requested: bool = False) -> PreviewStatus:
    done = manifest.state == JobState.DONE
    return PreviewStatus(
        preview_id=manifest.job_id,
        state=manifest.state,
        created_at=manifest.created_at,
        updated_at=manifest.updated_at,
        progress=manifest.progress,
        cancel_requested=cancel_requested and not manifest.terminal,
        error=manifest.error.model_dump() if manifest.error else None,
        report=manifest.report,
        video_url=f"/{API_VERSION}/previews/{manifest.job_id}/video" if done else None,
        anchor_url=(
            f"/{API_VERSION}/previews/{manifest.job_id}/anchor"
            if done and manifest.request.frames == "anchor"
            else None
        ),
        ledger=manifest.ledger,
    )


def _error_response(status: int, code: str, message: str, headers: dict | None = None):
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded):
        message = f"too many jobs in flight; retry in {exc.retry_after_s} s"
        headers = {"Retry-After": str(exc.retry_after_s)}
        return _error_response(503, "overloaded", message, headers)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError):
        return _error_response(exc.http_status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return _error_response(422, "invalid_request", _describe(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Starlette raises these itself: unknown paths, wrong methods (whose `Allow` header
        # must reach the client) and malformed multipart bodies.
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette's Allow names the first route matching the path only (GET of
            # /v1/jobs/{job_id}, not its DELETE): list every route's methods.
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return _error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception):
        # A bug: same shape as every other error (Starlette still logs the traceback).
        message = f"internal error ({type(exc).__name__})"
        return _error_response(500, "internal_error", message)


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    # Inside a Mount (the web page's files) the scope's root_path is the mount's: match from
    # the application's own root.
    scope = {**request.scope, "root_path": request.scope.get("app_root_path", "")}
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
            if isinstance(getattr(route, "app", None), StaticFiles):
                methods |= {"GET", "HEAD"}  # the web page's files
    return ", ".join(sorted(methods))


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}

# Why each status is sent, for the OpenAPI document.
_ERROR_REASONS = {
    400: "Malformed body (invalid JSON or multipart, undecodable text) or an empty upload.",
    401: "Missing or unknown API key.",
    403: "An s3:// input (video or reference) outside the allowed buckets, or not an s3:// URI.",
    404: "No such job (or preview) for this tenant (another tenant's is not found either).",
    409: "The job (or preview) is not done yet.",
    413: "The upload (or reference image) is over the size, duration, pixel or frame limits.",
    415: "Not a video, an unsupported codec, a reference that is not a single-frame PNG, JPEG "
    "or WebP image, or a body neither multipart nor JSON.",
    422: "The request does not validate (fields, styles, preset), the video or the reference "
    "image is corrupt (or the reference too small), or the s3:// input does not exist.",
    503: "Too many jobs (previews: too many previews, a pool of their own) in flight; retry "
    "after the `Retry-After` seconds.",
}


def _errors(*statuses: int) -> dict[int | str, dict]:
    responses: dict[int | str, dict] = {
        status: {"model": ErrorResponse, "description": _ERROR_REASONS[status]}
        for status in statuses
    }
    if 503 in statuses:
        responses[503]["headers"] = {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        }
    return responses


def _binary(media_type: str, description: str) -> dict[int | str, dict]:
    """OpenAPI responses of a route that sends a file of `media_type` once its job is done."""
    return {
        200: {
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
            "description": description,
        },
        **_errors(401, 404, 409),
    }


def _require_done(manifest: JobManifest) -> None:
    if manifest.state != JobState.DONE or not manifest.result_key:
        raise ApiError(409, "not_ready", f"the {manifest.kind} is {manifest.state}, not done")


def _describe(errors: list[dict]) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts)


def create_api(service, auth: Authenticator, on_request=None) -> FastAPI:
    """The FastAPI app over a `JobService` (see serve/jobs/service.py).

    `on_request`, if given, runs before every request (the ingress starts a scan for orphaned
    jobs when one is due).
    """
    app = FastAPI(
        title="motionserve",
        version=API_VERSION,
        description="Edit the motion of a person in a video at the lowest GPU cost.",
    )
    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app)

    if on_request is not None:

        @app.middleware("http")
        async def _before(request: Request, call_next):
            on_request()
            return await call_next(request)

    def tenant_of(request: Request) -> str:
        presented = request.headers.get("x-api-key")
        bearer = request.headers.get("authorization", "")
        if not presented and bearer.lower().startswith("bearer "):
            presented = bearer[7:].strip()
        tenant = auth.tenant_for(presented)
        if tenant is None:
            code = "missing_api_key" if not presented else "invalid_api_key"
            raise ApiError(401, code, "send a valid API key in the X-API-Key header")
        return tenant

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        tags=["ops"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready (same body)."}},
    )
    async def readyz() -> Response:
        ready, detail = await service.readiness()
        body = {"status": "ready" if ready else "not_ready", **detail}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post(
        f"/{API_VERSION}/jobs",
        status_code=202,
        response_model=JobAccepted,
        tags=["jobs"],
        responses=_errors(400, 401, 403, 413, 415, 422, 503),
        openapi_extra={"requestBody": _SUBMIT_BODY},
    )
    async def submit_job(request: Request) -> JobAccepted:
        """Multipart (`video` file + `request` JSON field) or JSON with an `input` s3:// URI."""
        manifest = await _accept(request, "job")
        return JobAccepted(
            job_id=manifest.job_id,
            state=manifest.state,
            status_url=f"/{API_VERSION}/jobs/{manifest.job_id}",
            result_url=f"/{API_VERSION}/jobs/{manifest.job_id}/result",
        )

    async def _accept(request: Request, kind: str) -> JobManifest:
        """A job's or a preview's body, checked the same way (same errors), then admitted."""
        tenant = tenant_of(request)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            return await _submit_upload(request, tenant, kind)
        if content_type.startswith("application/json"):
            return await _submit_s3(request, tenant, kind)
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with a 'video' file, or JSON with an s3:// 'input'",
        )

    async def _submit_upload(request: Request, tenant: str, kind: str) -> JobManifest:
        limits = service.limits
        limit = limits.max_bytes
        declared = int(request.headers.get("content-length") or 0)
        # multipart overhead and an optional reference image on top of the video
        if declared > limit + limits.max_reference_bytes + 1024 * 1024:
            raise ApiError(413, "limit_exceeded", f"uploads are limited to {limit / 1e6:.0f} MB")
        service.check_capacity(kind)  # refuse before reading a large body we cannot take
        form = await request.form(max_files=2, max_fields=4)
        try:
            video, spec = form.get("video"), form.get("request")
            reference = form.get("reference")
            if not isinstance(video, UploadFile):
                raise ApiError(422, "missing_video", "the multipart field 'video' is missing")
            if reference is not None and not isinstance(reference, UploadFile):
                raise ApiError(
                    422, "invalid_reference", "the multipart field 'reference' must be a file"
                )
            job_request = _parse_request(spec if isinstance(spec, str) else "{}")
            with tempfile.TemporaryDirectory(prefix="motionserve-upload-") as scratch:
                local = Path(scratch) / "input"
                size = await _save_upload(video, local, limit)
                if size == 0:
                    raise ApiError(400, "empty_input", "the uploaded video is empty")
                reference_path = None
                if reference is not None:
                    reference_path = Path(scratch) / "reference"
                    await _save_upload(
                        reference, reference_path, limits.max_reference_bytes, "reference images"
                    )
                return await service.submit_file(
                    tenant, job_request, local, kind, reference=reference_path
                )
        finally:
            await form.close()

    async def _submit_s3(request: Request, tenant: str, kind: str) -> JobManifest:
        try:
            body = await request.json()
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes not UTF-8
            raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("input"), str):
            raise ApiError(422, "missing_input", "JSON requests need an 'input' s3:// URI")
        uri = body.pop("input")
        reference = body.pop("reference", None)
        if reference is not None and not isinstance(reference, str):
            raise ApiError(422, "invalid_reference", "'reference' must be an s3:// URI")
        job_request = _parse_request(json.dumps(body))
        try:
            return await service.submit_s3(tenant, job_request, uri, kind, reference)
        except ObjectNotFound:
            where = uri if reference is None else f"{uri} or {reference}"
            raise ApiError(422, "input_not_found", f"no object at {where}") from None

    @app.get(
        f"/{API_VERSION}/jobs/{{job_id}}",
        response_model=JobStatus,
        tags=["jobs"],
        responses=_errors(401, 404),
    )
    async def get_job(job_id: str, request: Request) -> JobStatus:
        manifest = await _find(request, job_id)
        return _status(manifest, cancel_requested=await _cancel_marked(manifest))

    @app.get(
        f"/{API_VERSION}/jobs/{{job_id}}/result",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses=_binary("video/mp4", "The edited video."),
    )
    async def get_result(job_id: str, request: Request) -> Response:
        manifest = await _find(request, job_id)
        return await _video(manifest, f"{job_id}.mp4")

    @app.delete(
        f"/{API_VERSION}/jobs/{{job_id}}",
        response_model=JobStatus,
        tags=["jobs"],
        responses={
            202: {
                "model": JobStatus,
                "description": "Cancel requested; the job's replica stops it soon.",
            },
            **_errors(401, 404),
        },
    )
    async def cancel_job(job_id: str, request: Request) -> JSONResponse:
        """200 with the cancelled (or already finished) job; 202 while the job runs on another
        ingress replica, which stops it at its next chunk (poll GET until `cancelled`)."""
        manifest = await service.cancel(await _find(request, job_id))
        status = _status(manifest, cancel_requested=True)
        code = 202 if status.cancel_requested else 200
        return JSONResponse(status.model_dump(mode="json"), status_code=code)

    @app.post(
        f"/{API_VERSION}/previews",
        status_code=202,
        response_model=PreviewAccepted,
        tags=["previews"],
        responses=_errors(400, 401, 403, 413, 415, 422, 503),
        openapi_extra={"requestBody": _SUBMIT_BODY},
    )
    async def submit_preview(request: Request) -> PreviewAccepted:
        """The motion preview, CPU only: the same body as POST /v1/jobs. Runs the job's decode,
        pose and motion stages (the job that follows gets them from the cache), renders the
        source with the original skeleton beside the edited one, and estimates the job."""
        manifest = await _accept(request, "preview")
        return PreviewAccepted(
            preview_id=manifest.job_id,
            state=manifest.state,
            status_url=f"/{API_VERSION}/previews/{manifest.job_id}",
            video_url=f"/{API_VERSION}/previews/{manifest.job_id}/video",
        )

    @app.get(
        f"/{API_VERSION}/previews/{{preview_id}}",
        response_model=PreviewStatus,
        tags=["previews"],
        responses=_errors(401, 404),
    )
    async def get_preview(preview_id: str, request: Request) -> PreviewStatus:
        manifest = await _find(request, preview_id, "preview")
        return _preview_status(manifest, cancel_requested=await _cancel_marked(manifest))

    @app.get(
        f"/{API_VERSION}/previews/{{preview_id}}/video",
        tags=["previews"],
        response_class=StreamingResponse,
        responses=_binary(
            "video/mp4",
            "The preview: source + original skeleton | source + edited skeleton, at the "
            "generation fps and size.",
        ),
    )
    async def get_preview_video(preview_id: str, request: Request) -> Response:
        manifest = await _find(request, preview_id, "preview")
        return await _video(manifest, f"{preview_id}-preview.mp4")

    @app.get(
        f"/{API_VERSION}/previews/{{preview_id}}/anchor",
        tags=["previews"],
        response_class=Response,
        responses=_binary(
            "image/png",
            "The job's anchor keyframe (its frame 0 as the job will anchor every chunk on it), "
            "at the generation size.",
        ),
    )
    async def get_preview_anchor(preview_id: str, request: Request) -> Response:
        """The anchor-frame preview (asked for with `frames: "anchor"`)."""
        manifest = await _find(request, preview_id, "preview")
        if manifest.request.frames != "anchor":
            raise ApiError(404, "anchor_not_requested",
                           f"preview {preview_id} was not asked for its anchor frame "
                           '(submit with "frames": "anchor")')  # fmt: skip
        _require_done(manifest)
        key = anchor_image_key(manifest.result_key)
        data = await asyncio.to_thread(service.jobs.store.get_bytes, key)
        return Response(data, media_type="image/png")

    @app.delete(
        f"/{API_VERSION}/previews/{{preview_id}}",
        response_model=PreviewStatus,
        tags=["previews"],
        responses={
            202: {
                "model": PreviewStatus,
                "description": "Cancel requested; the preview's replica stops it soon.",
            },
            **_errors(401, 404),
        },
    )
    async def cancel_preview(preview_id: str, request: Request) -> JSONResponse:
        """Like DELETE /v1/jobs/{job_id}: 200 when stopped (or already finished), else 202."""
        manifest = await service.cancel(await _find(request, preview_id, "preview"))
        status = _preview_status(manifest, cancel_requested=True)
        code = 202 if status.cancel_requested else 200
        return JSONResponse(status.model_dump(mode="json"), status_code=code)

    @app.post(f"/{API_VERSION}/estimate", tags=["jobs"], responses=_errors(400, 401, 422))
    async def estimate(body: EstimateRequest, request: Request) -> EstimateResponse:
        tenant_of(request)
        _check_preset(body.request)
        return service.estimate(body.request, body.duration_s, body.width, body.height)

    async def _find(request: Request, job_id: str, kind: str = "job") -> JobManifest:
        """The tenant's job (or preview): a preview's id is not a job's, nor the reverse."""
        tenant = tenant_of(request)
        try:
            manifest = await service.get(tenant, job_id)
        except JobNotFound:
            manifest = None
        if manifest is None or manifest.kind != kind:
            raise ApiError(404, f"{kind}_not_found", f"no {kind} {job_id}") from None
        return manifest

    async def _cancel_marked(manifest: JobManifest) -> bool:
        """Whether a cancel is asked for a job (or preview) still running (on any replica)."""
        return not manifest.terminal and await asyncio.to_thread(
            service.jobs.cancel_requested, manifest.tenant, manifest.job_id
        )

    async def _video(manifest: JobManifest, filename: str) -> Response:
        _require_done(manifest)
        stream = await service.open_result(manifest)
        return StreamingResponse(
            iter(lambda: stream.read(1 << 20), b""),
            media_type="video/mp4",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
            background=_closer(stream),
        )

    return app


def _parse_request(text: str) -> JobRequest:
    try:
        request = JobRequest.model_validate_json(text)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _describe(exc.errors())) from None
    return _check_preset(request)


def _check_preset(request: JobRequest) -> JobRequest:
    # The model admits 'naive' (the benchmarks run the baseline in process); the API does not.
    if request.preset is not None and request.preset not in PUBLIC_PRESETS:
        raise ApiError(422, "invalid_preset", f"preset must be one of {list(PUBLIC_PRESETS)}")
    return request


# POST /v1/jobs reads its body by hand (a large upload is refused before it is read), so its
# OpenAPI request body is written here; `_openapi` adds the S3JobRequest schema it names.
_SUBMIT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["video"],
                "properties": {
                    "video": {
                        "type": "string",
                        "format": "binary",
                        "description": "The input video (any container and codec PyAV reads).",
                    },
                    "reference": {
                        "type": "string",
                        "format": "binary",
                        "description": "Optional reference image (PNG, JPEG or WebP, one frame; "
                        "limits `max_reference_bytes`, `max_reference_pixels`, short side at "
                        "least `min_reference_side`): the character's look. It turns anchor "
                        "attention on with the reference as the anchor (override `anchor` "
                        "to change that) and is part of the job's content keys.",
                    },
                    "request": {
                        "$ref": "#/components/schemas/JobRequest",
                        "description": "The edit request as a JSON text field; `prompt` is "
                        "required.",
                    },
                },
            },
            "encoding": {"request": {"contentType": "application/json"}},
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/S3JobRequest"}},
    },
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, plus the schemas of the hand-read body, with FastAPI's `{detail}`
    422 replaced: validation errors are `ErrorResponse`s like every other error."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = document.setdefault("components", {}).setdefault("schemas", {})
    extra = S3JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in {**extra.pop("$defs", {}), "S3JobRequest": extra}.items():
        components.setdefault(name, schema)
    # The styles' parameters: `JobRequest.styles` holds them as texts, documented here.
    for name, schema in motion_style_schemas().items():
        components.setdefault(name, schema)
    # Keys are checked by hand (tenant_of); with none configured every caller is `local`.
    document["components"]["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if path.startswith(f"/{API_VERSION}/"):
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
            responses = operation.get("responses", {})
            invalid = responses.get("422", {}).get("content", {}).get("application/json", {})
            if invalid.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]  # added by FastAPI for path parameters no value fails
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = document
    return document


async def _save_upload(upload: UploadFile, dest: Path, limit: int, what: str = "uploads") -> int:
    size = 0
    with dest.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "limit_exceeded", f"{what} are limited to {limit / 1e6:.0f} MB")
            out.write(chunk)
    return size


def _closer(stream):
    from starlette.background import BackgroundTask

    return BackgroundTask(stream.close)
