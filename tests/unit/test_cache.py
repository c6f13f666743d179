"""Content keys (pure) and the artifact cache on LocalStore and on S3Store (moto)."""

from __future__ import annotations

import hashlib
import json
import threading
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, Field

from serve.cache import ArtifactCache, canonical_json, content_key, hash_bytes, hash_file
from serve.storage import LocalStore, ObjectStore

VIDEO = hash_bytes(b"pretend video bytes")


class DecodeSettings(BaseModel):
    fps: float = Field(default=8.0, description="Generation frame rate.")
    width: int = Field(default=512, description="Generation width.")
    height: int = Field(default=288, description="Generation height.")


# --- content keys -------------------------------------------------------------------------


def test_content_key_is_a_sha256_hex_digest():
    key = content_key("decode", "1", {"fps": 8}, [VIDEO])
    assert len(key) == 64 and int(key, 16) >= 0 and key == key.lower()


def test_content_key_format_is_pinned():
    # A change here silently invalidates every cached artifact: bump KEY_FORMAT deliberately.
    key = content_key("decode", "1", {"fps": 8.5, "size": [512, 288]}, ["ab" * 32])
    payload = (
        '{"code_version":"1","format":1,"inputs":["' + "ab" * 32 + '"],'
        '"settings":{"fps":8.5,"size":[512,288]},"stage":"decode"}'
    )
    assert key == hashlib.sha256(payload.encode()).hexdigest()


def test_content_key_ignores_dict_ordering():
    first = {"fps": 8, "size": {"w": 512, "h": 288}, "style": "smooth"}
    second = {"style": "smooth", "size": {"h": 288, "w": 512}, "fps": 8}
    assert content_key("s", "1", first, [VIDEO]) == content_key("s", "1", second, [VIDEO])


def test_settings_model_and_equal_dict_give_the_same_key():
    model_key = content_key("decode", "1", DecodeSettings(), [VIDEO])
    dict_key = content_key("decode", "1", {"fps": 8.0, "width": 512, "height": 288}, [VIDEO])
    assert model_key == dict_key


@pytest.mark.parametrize(
    "changed",
    [
        {"stage": "pose"},
        {"code_version": "2"},
        {"settings": {"fps": 12}},
        {"settings": {"fps": 8, "extra": None}},
        {"settings": None},
        {"inputs": [hash_bytes(b"another video")]},
        {"inputs": [VIDEO, VIDEO]},
        {"inputs": []},
    ],
)
def test_content_key_changes_with_each_part(changed):
    base = {"stage": "decode", "code_version": "1", "settings": {"fps": 8}, "inputs": [VIDEO]}
    assert content_key(**base) != content_key(**{**base, **changed})


def test_input_order_matters():
    a, b = hash_bytes(b"a"), hash_bytes(b"b")
    assert content_key("blend", "1", None, [a, b]) != content_key("blend", "1", None, [a, b][::-1])


def test_equal_numbers_hash_equal_but_booleans_do_not():
    def key(value):
        return content_key("s", "1", {"v": value}, [])

    assert key(1) == key(1.0) == key(np.int64(1)) == key(np.float32(1.0))
    assert key(0.0) == key(-0.0) == key(0)
    assert key(0.1) == key(np.float64(0.1)) != key(0.1000001)
    assert key(True) != key(1)
    assert key(False) != key(0) != key(None)
    assert key(float("inf")) != key(float("-inf")) != key("inf")
    assert key(float("inf")) == key(float("inf"))


def test_canonical_json_handles_enums_tuples_and_paths():
    class Style(Enum):
        SMOOTH = "smooth"

    value = {"style": Style.SMOOTH, "size": (512, 288), "path": Path("/w/x")}
    assert canonical_json(value) == '{"path":"/w/x","size":[512,288],"style":"smooth"}'


def test_content_key_rejects_what_cannot_hash_deterministically():
    with pytest.raises(TypeError, match="content key"):
        content_key("s", "1", {"model": object()}, [])
    with pytest.raises(TypeError, match="content key"):
        content_key("s", "1", {"tags": {"a", "b"}}, [])
    with pytest.raises(TypeError, match="strings"):
        content_key("s", "1", {1: "a"}, [])
    with pytest.raises(TypeError, match="single string"):
        content_key("s", "1", None, VIDEO)
    with pytest.raises(ValueError, match="stage"):
        content_key("", "1", None, [])
    with pytest.raises(ValueError, match="code_version"):
        content_key("s", "", None, [])


def test_keys_chain_so_upstream_changes_propagate():
    def chain(video: bytes, style: str) -> list[str]:
        decoded = content_key("decode", "1", {"fps": 8}, [hash_bytes(video)])
        pose = content_key("pose", "1", None, [decoded])
        motion = content_key("motion", "1", {"style": style}, [pose])
        return [decoded, pose, motion]

    base = chain(b"video", "smooth")
    assert chain(b"video", "smooth") == base
    restyled = chain(b"video", "robot")
    assert restyled[:2] == base[:2] and restyled[2] != base[2]
    other_video = chain(b"other video", "smooth")
    assert all(new != old for new, old in zip(other_video, base, strict=True))


def test_hash_file_streams_the_same_digest_as_hash_bytes(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # crosses block boundaries
    path = tmp_path / "v.bin"
    path.write_bytes(data)
    assert hash_file(path) == hash_bytes(data) == hashlib.sha256(data).hexdigest()
    assert hash_bytes(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# --- the cache, on both backends ----------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("moto_s3").store()


@pytest.fixture
def cache(store) -> ArtifactCache:
    return ArtifactCache(store, namespace="cache")


KEY = content_key("decode", "1", {"fps": 8}, [VIDEO])
META = {"stage": "decode", "settings": DecodeSettings(), "inputs": [VIDEO]}


def test_put_then_get_with_sidecar(cache, store):
    assert cache.get(KEY) is None and not cache.contains(KEY)
    assert cache.get_with_meta(KEY) is None
    cache.put(KEY, b"frames", META)
    assert cache.contains(KEY)
    assert cache.get(KEY) == b"frames"
    assert list(store.list("cache/")) == [
        f"cache/{KEY[:2]}/{KEY}/data",
        f"cache/{KEY[:2]}/{KEY}/meta.json",
    ]
    sidecar = json.loads(store.get_bytes(cache.meta_key(KEY)))
    assert sidecar["stage"] == "decode" and sidecar["inputs"] == [VIDEO]
    assert sidecar["settings"] == {"fps": 8.0, "width": 512, "height": 288}
    assert sidecar["size"] == 6 and sidecar["sha256"] == hash_bytes(b"frames")
    assert sidecar["key"] == KEY and sidecar["created_at"].endswith("+00:00")
    assert cache.get_meta(KEY) == sidecar
    assert cache.get_with_meta(KEY) == (b"frames", sidecar)


def test_get_or_compute_computes_once_then_hits(cache):
    calls = []

    def compute() -> bytes:
        calls.append(1)
        return b"expensive"

    assert cache.get_or_compute(KEY, compute, META) == (b"expensive", False)
    assert cache.get_or_compute(KEY, compute, META) == (b"expensive", True)
    assert cache.get_or_compute(KEY, compute, META) == (b"expensive", True)
    assert len(calls) == 1
    assert cache.stats() == {
        "hits": 2,
        "misses": 1,
        "puts": 1,
        "bytes_read": 18,
        "bytes_written": 9,
    }


def test_a_new_cache_object_sees_stored_artifacts(cache, store):
    cache.put(KEY, b"kept", META)
    fresh = ArtifactCache(store, namespace="cache")
    assert fresh.get_or_compute(KEY, lambda: pytest.fail("recomputed"), META) == (b"kept", True)
    assert ArtifactCache(store, namespace="other").get(KEY) is None


def test_compute_that_raises_stores_nothing(cache, store):
    def compute() -> bytes:
        raise RuntimeError("GPU fell over")

    with pytest.raises(RuntimeError, match="GPU fell over"):
        cache.get_or_compute(KEY, compute, META)
    assert not cache.contains(KEY)
    assert list(store.list()) == []
    assert cache.stats()["puts"] == 0
    with pytest.raises(TypeError, match="bytes"):
        cache.get_or_compute(KEY, lambda: "not bytes", META)
    assert list(store.list()) == []


def test_data_without_sidecar_is_a_miss(cache, store):
    # A crash between the data write and the sidecar write.
    store.put_bytes(cache.data_key(KEY), b"orphan")
    assert not cache.contains(KEY)
    assert cache.get(KEY) is None
    assert cache.get_or_compute(KEY, lambda: b"redone", META) == (b"redone", False)
    assert cache.get(KEY) == b"redone"


def test_data_not_matching_its_sidecar_is_a_miss(cache, store):
    cache.put(KEY, b"original", META)
    store.put_bytes(cache.data_key(KEY), b"a racing writer's longer bytes")
    assert cache.get(KEY) is None
    store.delete(cache.data_key(KEY))
    assert cache.get(KEY) is None
    assert cache.stats()["misses"] == 2


def test_file_artifacts_round_trip(cache, tmp_path):
    source = tmp_path / "encoded.mp4"
    source.write_bytes(b"\x00mp4" * 50_000)
    assert cache.get_file(KEY, tmp_path / "out" / "a.mp4") is None
    assert not (tmp_path / "out" / "a.mp4").exists()
    cache.put_file(KEY, source, META)
    got = cache.get_file(KEY, tmp_path / "out" / "a.mp4")
    assert got is not None and got.read_bytes() == source.read_bytes()
    assert cache.get_meta(KEY)["sha256"] == hash_file(source)


def test_get_or_compute_file(cache, tmp_path):
    calls = []

    def compute(path: Path) -> None:
        calls.append(path)
        path.write_bytes(b"big artifact")

    dest = tmp_path / "results" / "out.mp4"
    assert cache.get_or_compute_file(KEY, compute, dest, META) == (dest, False)
    assert dest.read_bytes() == b"big artifact"
    assert calls[0].parent.parent == dest.parent and not calls[0].exists()
    dest.unlink()
    assert cache.get_or_compute_file(KEY, compute, dest, META) == (dest, True)
    assert dest.read_bytes() == b"big artifact" and len(calls) == 1
    assert sorted(path.name for path in dest.parent.iterdir()) == ["out.mp4"]


def test_get_or_compute_file_failure_stores_nothing(cache, store, tmp_path):
    def compute(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("encoder crashed")

    dest = tmp_path / "r" / "out.mp4"
    with pytest.raises(OSError, match="encoder crashed"):
        cache.get_or_compute_file(KEY, compute, dest, META)
    with pytest.raises(RuntimeError, match="wrote no file"):
        cache.get_or_compute_file(KEY, lambda path: None, dest, META)
    assert not cache.contains(KEY) and list(store.list()) == []
    assert list(dest.parent.iterdir()) == []


def test_delete_removes_the_artifact(cache, store):
    cache.put(KEY, b"x", META)
    cache.delete(KEY)
    assert not cache.contains(KEY) and cache.get(KEY) is None
    assert list(store.list()) == []
    cache.delete(KEY)  # idempotent


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "../" + "a" * 61, KEY + "0"])
def test_cache_keys_must_be_sha256_hex(cache, bad):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.get(bad)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.put(bad, b"x")


def test_meta_cannot_overwrite_reserved_fields(cache, store):
    with pytest.raises(ValueError, match="reserved"):
        cache.put(KEY, b"x", {"size": 1})
    assert not cache.contains(KEY)


def test_counters_are_exact_under_threads(tmp_path):
    cache = ArtifactCache(LocalStore(tmp_path))
    keys = [content_key("s", "1", {"i": i}, []) for i in range(4)]
    for key in keys:
        cache.put(key, b"v", {})

    def reader():
        for key in keys * 10:
            assert cache.get(key) == b"v"

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.stats()["hits"] == 160 and cache.stats()["bytes_read"] == 160
