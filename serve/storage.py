"""Object store: one interface, a local-directory backend (default) and an S3 backend.

Keys are relative POSIX paths such as ``artifacts/ab/abcd.../frames.npz``. They are validated
(`validate_key`) so that no key can escape the store's root, whatever a caller passes in.

Atomicity: a reader never sees a half-written object under its key.
- `LocalStore` writes to a temp file in the target's directory, fsyncs it and `os.replace`s it
  over the key; a crash leaves at most a temp file (prefix `TEMP_PREFIX`), which `list` ignores.
- `S3Store` gets this for free: S3 makes an object visible only once its PUT (or the completion
  of its multipart upload) succeeds; a failed multipart upload is aborted by boto3.

`list` and `delete_prefix` take a *string* prefix, as S3 does: ``"jobs/ab"`` also matches
``"jobs/abc/x"``; end the prefix with ``/`` to mean a folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from deployments.model_loading import s3_client

TEMP_PREFIX = ".tmp-motionserve-"
"""Name prefix of in-progress local writes; no valid key segment may start with it."""

MAX_KEY_BYTES = 1024  # S3's limit on a full object key, applied to every backend alike
_COPY_BLOCK = 1 << 20
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DEFAULT_S3_REGION = "us-east-1"


class ObjectNotFound(KeyError):
    """No object is stored under `key` (every backend raises this for a missing key)."""

    def __init__(self, key: str, uri: str | None = None):
        super().__init__(key)
        self.key = key
        self.uri = uri or key

    def __str__(self) -> str:  # KeyError's own __str__ would quote the message
        return f"object not found: {self.uri}"


def _key_problem(key: str, *, allow_trailing_slash: bool = False) -> str | None:
    """Why `key` is not a valid relative object key, or None when it is."""
    if not key:
        return "is empty"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return "starts with '/'"
    if "\\" in key:
        return "contains a backslash"
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        return "contains a control character"
    body = key[:-1] if allow_trailing_slash and key.endswith("/") else key
    for segment in body.split("/"):
        if segment == "":
            return "has an empty path segment"
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
        if segment.startswith(TEMP_PREFIX):
            return f"has a segment starting with the reserved prefix {TEMP_PREFIX!r}"
    return None


def validate_key(key: str) -> str:
    """Return `key` if it is a valid object key; raise ValueError saying why it is not."""
    if not isinstance(key, str):
        raise ValueError(f"object key must be a string, not {type(key).__name__}")
    problem = _key_problem(key)
    if problem:
        raise ValueError(f"invalid object key {key!r}: it {problem}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if valid for `list`: empty, or a key that may end with '/'."""
    if not isinstance(prefix, str):
        raise ValueError(f"key prefix must be a string, not {type(prefix).__name__}")
    if prefix == "":
        return prefix
    problem = _key_problem(prefix, allow_trailing_slash=True)
    if problem:
        raise ValueError(f"invalid key prefix {prefix!r}: it {problem}")
    return prefix


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty.

    One trailing '/' (a folder-like prefix) is dropped from the key. Raises ValueError for
    anything else than a well-formed URI with a valid bucket name and a valid key, so it can
    vet user-provided inputs.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    if any(char in uri for char in "?#") or any(char.isspace() for char in uri):
        raise ValueError(f"S3 URI must not contain '?', '#' or whitespace: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket name: {uri!r}")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid S3 bucket name {bucket!r} in {uri!r}: use 3-63 lowercase letters, "
            "digits, '.' or '-', starting and ending with a letter or digit"
        )
    key = key.removesuffix("/")
    if key:
        problem = _key_problem(key)
        if problem:
            raise ValueError(f"invalid key in S3 URI {uri!r}: it {problem}")
    return bucket, key


class ObjectStore(ABC):
    """A flat key -> bytes store with folder-like keys. Implementations are thread-safe."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> None:
        """Store everything read from `stream` under `key`, atomically (all or nothing)."""

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store `data` under `key`, atomically, replacing any previous object."""
        self.put_stream(key, io.BytesIO(data), content_type)

    @abstractmethod
    def create_bytes(self, key: str, data: bytes) -> bool:
        """Store `data` under `key` only if no object is there: True if this call created it,
        False if one existed. Atomic across processes and machines (the primitive job leases
        are claimed with)."""

    def put_file(
        self, key: str, path: str | os.PathLike[str], content_type: str | None = None
    ) -> None:
        """Store the file at `path` under `key`, streamed (multipart on S3 for large files)."""
        with open(path, "rb") as handle:
            self.put_stream(key, handle, content_type)

    @abstractmethod
    def open_read(self, key: str) -> IO[bytes]:
        """A readable binary stream of the object; close it (use `with`). ObjectNotFound."""

    def get_bytes(self, key: str) -> bytes:
        """The whole object. Raises ObjectNotFound."""
        with self.open_read(key) as stream:
            return stream.read()

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> Path:
        """Download the object to `dest_path` (parents created) via a temp file and a rename,
        so `dest_path` is either absent, its old content, or the complete object."""
        dest = Path(dest_path)
        with _atomic_output(dest) as handle:
            self._download_to(key, handle)
        return dest

    def _download_to(self, key: str, handle: BinaryIO) -> None:
        with self.open_read(key) as stream:
            shutil.copyfileobj(stream, handle, _COPY_BLOCK)

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes. Raises ObjectNotFound."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with the string `prefix`, recursively, in sorted order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object under `key`; deleting a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with the non-empty `prefix`; returns how many."""

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A URL from which the object can be downloaded without credentials. ObjectNotFound."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The object's (or, for an empty key, the store root's) URI; `open_store` accepts it."""


def _require_delete_prefix(prefix: str) -> str:
    # An empty prefix would wipe the whole store: too easy to do by accident.
    if not prefix:
        raise ValueError("delete_prefix needs a non-empty prefix")
    return validate_prefix(prefix)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse to open directories.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_temp_file(directory: Path, attempts: int = 3) -> tuple[int, Path]:
    """Create `directory` if needed and a temp file in it."""
    for attempt in range(attempts):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
            return fd, Path(name)
        except FileNotFoundError:
            # A concurrent delete pruned the just-created empty folder: make it again.
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _atomic_output(dest: Path) -> Iterator[BinaryIO]:
    """Yield a temp file beside `dest`; on success fsync and rename it over `dest`."""
    fd, temp_path = _make_temp_file(dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, dest)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(dest.parent)


class LocalStore(ObjectStore):
    """Objects as files under `root`. `content_type` is accepted and ignored (not stored).

    Unlike S3, a key cannot also be the folder of other keys (``a`` and ``a/b``): the second
    write fails with an OSError. motionserve's key layouts never do this.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> None:
        with _atomic_output(self._path(key)) as handle:
            shutil.copyfileobj(stream, handle, _COPY_BLOCK)

    def create_bytes(self, key: str, data: bytes) -> bool:
        dest = self._path(key)
        fd, temp_path = _make_temp_file(dest.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(temp_path, dest)  # fails if dest exists: an atomic create-if-absent
        except FileExistsError:
            return False
        finally:
            temp_path.unlink(missing_ok=True)
        _fsync_directory(dest.parent)
        return True

    def open_read(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.uri(key)) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key, self.uri(key))
        return path.stat().st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix names, then filter by the string prefix.
        folder = prefix.rpartition("/")[0]
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [name for name in dirnames if not name.startswith(TEMP_PREFIX)]
            relative_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = name if relative_dir == "." else f"{relative_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._prune_empty_parents(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(_require_delete_prefix(prefix)))
        for key in keys:
            self.delete(key)
        return len(keys)

    def _prune_empty_parents(self, directory: Path) -> None:
        # Leaves no empty folders behind, so the tree mirrors the S3 key space.
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone while another writer works)
                return
            directory = directory.parent

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A ``file://`` URI: local files need no signature, and `expires_s` is ignored."""
        if not self.exists(key):
            raise ObjectNotFound(key, self.uri(key))
        return self._path(key).as_uri()

    def uri(self, key: str = "") -> str:
        return (self._path(key) if key else self.root).as_uri()


class S3Store(ObjectStore):
    """Objects in an S3 bucket (AWS, MinIO, moto) under an optional key `prefix`.

    Credentials come from boto3's usual chain (env, profile, IRSA/instance role). Files above
    `multipart_threshold` bytes upload in parts of `multipart_chunksize` bytes (S3 requires
    parts of at least 5 MiB, so boto3 raises smaller chunk sizes to 5 MiB).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        region: str = DEFAULT_S3_REGION,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
        max_concurrency: int = 4,
    ):
        from boto3.s3.transfer import TransferConfig

        parse_s3_uri(f"s3://{bucket}/{prefix}")  # validates both
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or s3_client(endpoint_url, region)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )

    def full_key(self, key: str) -> str:
        """The S3 object key (store prefix included) for a store key."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        validate_prefix(prefix)
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def put_stream(self, key: str, stream: BinaryIO, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        self.client.upload_fileobj(
            stream, self.bucket, self.full_key(key), ExtraArgs=extra, Config=self.transfer_config
        )

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data, **extra)

    def create_bytes(self, key: str, data: bytes) -> bool:
        # S3 conditional write (If-None-Match: *): 412 if the key exists, 409 if a concurrent
        # conditional write to the same key won the race.
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.full_key(key), Body=data, IfNoneMatch="*"
            )
        except self.client.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            raise
        return True

    def open_read(self, key: str) -> IO[bytes]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
        except self.client.exceptions.ClientError as error:
            raise self._translate(error, key) from None
        return response["Body"]

    def _download_to(self, key: str, handle: BinaryIO) -> None:
        try:
            self.client.download_fileobj(
                self.bucket, self.full_key(key), handle, Config=self.transfer_config
            )
        except self.client.exceptions.ClientError as error:
            raise self._translate(error, key) from None

    def _head(self, key: str) -> dict:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
        except self.client.exceptions.ClientError as error:
            raise self._translate(error, key) from None

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        return self._list_full(self._full_prefix(prefix))  # validates now, not on first next()

    def _list_full(self, full_prefix: str) -> Iterator[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        # S3 lists keys in UTF-8 byte order, which is Python's str order: already sorted.
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for entry in page.get("Contents", []):
                if not entry["Key"].endswith("/"):  # skip console-made "folder" markers
                    yield entry["Key"][strip:]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(_require_delete_prefix(prefix)))
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.full_key(key)} for key in keys[start : start + 1000]]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise OSError(f"S3 refused to delete {first['Key']}: {first.get('Message')}")
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET URL valid for `expires_s` seconds."""
        self._head(key)  # a URL for a missing object would only fail later, on the client
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.full_key(key)},
            ExpiresIn=int(expires_s),
        )

    def uri(self, key: str = "") -> str:
        path = self.full_key(key) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def _translate(self, error: Exception, key: str) -> Exception:
        code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return ObjectNotFound(key, self.uri(key))
        return error


def open_store(
    uri: str, *, s3_endpoint_url: str | None = None, region: str = DEFAULT_S3_REGION
) -> ObjectStore:
    """``s3://bucket/prefix`` -> S3Store; a local path or ``file://`` URI -> LocalStore."""
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, endpoint_url=s3_endpoint_url, region=region)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI must name a local path: {uri!r}")
        return LocalStore(unquote(parsed.path))
    if "://" in uri:
        raise ValueError(f"unsupported store URI {uri!r}: use a local path or s3://bucket/prefix")
    if not uri:
        raise ValueError("store URI is empty")
    return LocalStore(uri)
