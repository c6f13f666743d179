"""Content-addressed artifact cache on top of an `ObjectStore`.

Every stage's output is stored under a content key: the sha256 of the stage's name, its code
version, its settings and its inputs' keys (`content_key`). The root of a chain is the input
video's bytes hash (`hash_file`), and each stage's key is an input of the next stage's key, so a
change anywhere upstream changes every key downstream, and nothing else does.

Layout: ``{namespace}/{key[:2]}/{key}/data`` and a JSON sidecar ``.../meta.json``. The data is
written first and the sidecar last, each atomically, so a present sidecar means a complete
artifact: a crash between the two leaves an orphan data object that reads as a miss.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python

from serve.storage import TEMP_PREFIX, ObjectNotFound, ObjectStore, validate_key

KEY_FORMAT = 1
"""Version of the content-key payload itself; bump it to invalidate every cached artifact."""

_HASH_BLOCK = 1 << 20
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_META = frozenset({"key", "size", "sha256", "created_at"})


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in blocks so large videos never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _canonical(value: Any) -> Any:
    """`value` as plain JSON data with one spelling per meaning.

    Numbers that compare equal hash equal (``1 == 1.0``, so both become ``1``): a stage reads a
    setting's value, not the type a caller happened to write it with. Booleans stay distinct
    from numbers. Non-finite floats, which JSON cannot spell, become tagged objects.
    """
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):  # also numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # also numpy floats
        number = float(value)
        if not math.isfinite(number):
            return {"$float": repr(number)}
        return int(number) if number.is_integer() else number
    if isinstance(value, Enum):
        return _canonical(value.value)
    if isinstance(value, Mapping):
        if not all(isinstance(name, str) for name in value):
            raise TypeError(f"settings keys must be strings, got {list(value)!r}")
        return {name: _canonical(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    # Paths, datetimes, UUIDs... through pydantic. Sets iterate in a per-process order and other
    # objects would hash a repr with their address, so refuse them.
    try:
        converted = to_jsonable_python(value)
    except PydanticSerializationError:
        converted = value
    if converted is value or isinstance(value, set | frozenset):
        raise TypeError(f"cannot build a content key from a {type(value).__name__}: {value!r}")
    return _canonical(converted)


def canonical_json(value: Any) -> str:
    """Deterministic JSON text of `value` (sorted keys, no whitespace, ASCII only)."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_key(
    stage: str,
    code_version: str,
    settings: BaseModel | Mapping[str, Any] | None,
    inputs: Sequence[str],
) -> str:
    """Hex sha256 naming the output of `stage` (at `code_version`) with `settings` on `inputs`.

    `inputs` are the keys of the stage's inputs (a file's `hash_file`, or upstream content
    keys). Their order matters: it is the order of the stage's arguments, and two inputs swapped
    are a different computation. A settings model and a dict with the same values give the
    same key.
    """
    if not isinstance(stage, str) or not stage:
        raise ValueError("stage must be a non-empty string")
    if not isinstance(code_version, str) or not code_version:
        raise ValueError("code_version must be a non-empty string")
    if isinstance(inputs, str | bytes) or not all(isinstance(key, str) for key in inputs):
        raise TypeError("inputs must be a sequence of key strings (not a single string)")
    payload = {
        "format": KEY_FORMAT,
        "stage": stage,
        "code_version": code_version,
        "settings": settings,
        "inputs": list(inputs),
    }
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


def _validate_cache_key(key: str) -> str:
    if not isinstance(key, str) or not _HEX_KEY.match(key):
        raise ValueError(f"cache key must be 64 lowercase hex digits (a sha256), got {key!r}")
    return key


class ArtifactCache:
    """Artifacts by content key in `store` under `namespace`; counts hits and misses.

    Thread-safe. Two workers missing the same key at once both compute and both store; the
    last complete write wins, which is harmless because either output is valid for the key.
    """

    def __init__(self, store: ObjectStore, namespace: str = "cache"):
        self.store = store
        self.namespace = validate_key(namespace.strip("/"))
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "puts": 0, "bytes_read": 0, "bytes_written": 0}

    def data_key(self, key: str) -> str:
        """Store key of the artifact's bytes."""
        return f"{self._folder(key)}/data"

    def meta_key(self, key: str) -> str:
        """Store key of the artifact's JSON sidecar (its presence marks a complete artifact)."""
        return f"{self._folder(key)}/meta.json"

    def _folder(self, key: str) -> str:
        _validate_cache_key(key)
        return f"{self.namespace}/{key[:2]}/{key}"

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                self._counts[name] += amount

    def stats(self) -> dict[str, int]:
        """Counters since creation: hits, misses, puts, bytes_read, bytes_written."""
        with self._lock:
            return dict(self._counts)

    def contains(self, key: str) -> bool:
        """Whether a complete artifact is stored under `key` (not counted as a lookup)."""
        return self.store.exists(self.meta_key(key))

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """The artifact's sidecar, or None when there is no complete artifact."""
        try:
            return json.loads(self.store.get_bytes(self.meta_key(key)))
        except ObjectNotFound:
            return None

    def get(self, key: str) -> bytes | None:
        """The artifact's bytes, or None on a miss."""
        found = self.get_with_meta(key)
        return found[0] if found else None

    def get_with_meta(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        """The artifact's bytes and its sidecar (one read of each), or None on a miss."""
        meta = self.get_meta(key)
        data = None
        if meta is not None:
            try:
                data = self.store.get_bytes(self.data_key(key))
            except ObjectNotFound:  # deleted since the sidecar was read
                data = None
        if data is None or len(data) != meta["size"]:
            self._count(misses=1)
            return None
        self._count(hits=1, bytes_read=len(data))
        return data, meta

    def get_file(self, key: str, dest_path: str | os.PathLike[str]) -> Path | None:
        """Download the artifact to `dest_path` (atomically); None on a miss."""
        meta = self.get_meta(key)
        dest = Path(dest_path)
        if meta is not None:
            try:
                self.store.get_file(self.data_key(key), dest)
            except ObjectNotFound:
                meta = None
        if meta is not None and dest.stat().st_size != meta["size"]:
            dest.unlink()  # overwritten by a racing writer: not the artifact the sidecar names
            meta = None
        if meta is None:
            self._count(misses=1)
            return None
        self._count(hits=1, bytes_read=meta["size"])
        return dest

    def put(self, key: str, data: bytes, meta: Mapping[str, Any] | None = None) -> None:
        """Store `data` under `key` with `meta` (stage, settings, inputs...) in its sidecar."""
        self.store.put_bytes(self.data_key(key), data)
        self._write_meta(key, meta, size=len(data), sha256=hash_bytes(data))

    def put_file(
        self, key: str, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store the file at `path` under `key`, streamed, with `meta` in its sidecar."""
        size, digest = os.path.getsize(path), hash_file(path)
        self.store.put_file(self.data_key(key), path)
        self._write_meta(key, meta, size=size, sha256=digest)

    def _write_meta(
        self, key: str, meta: Mapping[str, Any] | None, *, size: int, sha256: str
    ) -> None:
        extra = dict(meta or {})
        clash = _RESERVED_META & extra.keys()
        if clash:
            raise ValueError(f"meta must not set reserved fields {sorted(clash)}")
        sidecar = {
            **to_jsonable_python(extra),
            "key": key,
            "size": size,
            "sha256": sha256,
            "created_at": datetime.now(UTC).isoformat(),
        }
        body = json.dumps(sidecar, sort_keys=True, indent=1).encode("utf-8")
        self.store.put_bytes(self.meta_key(key), body, content_type="application/json")
        self._count(puts=1, bytes_written=size)

    def get_or_compute(
        self, key: str, compute: Callable[[], bytes], meta: Mapping[str, Any] | None = None
    ) -> tuple[bytes, bool]:
        """``(data, hit)``: the cached artifact, or `compute()`'s result after storing it.

        If `compute` raises, nothing is stored and the exception propagates.
        """
        data = self.get(key)
        if data is not None:
            return data, True
        data = compute()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"compute must return bytes, got {type(data).__name__}")
        data = bytes(data)
        self.put(key, data, meta)
        return data, False

    def get_or_compute_file(
        self,
        key: str,
        compute: Callable[[Path], None],
        dest_path: str | os.PathLike[str],
        meta: Mapping[str, Any] | None = None,
    ) -> tuple[Path, bool]:
        """``(dest_path, hit)`` for large artifacts: on a miss `compute(path)` writes the
        artifact to a temp `path` beside `dest_path`; it is stored, then moved to `dest_path`.

        If `compute` raises or writes nothing, nothing is stored and `dest_path` is untouched.
        """
        dest = Path(dest_path)
        if self.get_file(key, dest) is not None:
            return dest, True
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=dest.parent) as scratch:
            produced = Path(scratch) / dest.name
            compute(produced)
            if not produced.is_file():
                raise RuntimeError(f"compute for cache key {key} wrote no file at {produced}")
            self.put_file(key, produced, meta)
            os.replace(produced, dest)
        return dest, False

    def delete(self, key: str) -> None:
        """Remove the artifact; the sidecar goes first, so it never names missing data."""
        self.store.delete(self.meta_key(key))
        self.store.delete(self.data_key(key))
