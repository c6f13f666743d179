"""The object-store contract, run against LocalStore and against S3Store on a moto server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from serve.storage import (
    TEMP_PREFIX,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    open_store,
    parse_s3_uri,
)

MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("moto_s3").store()


class FailingStream(io.RawIOBase):
    """Yields `good_bytes` bytes, then raises as a dying upload source would."""

    def __init__(self, good_bytes: int):
        self.remaining = good_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.remaining <= 0:
            raise ConnectionResetError("client went away mid-upload")
        count = min(len(buffer), self.remaining, 64 * 1024)
        buffer[:count] = b"x" * count
        self.remaining -= count
        return count


def temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(TEMP_PREFIX)]


# --- round trips --------------------------------------------------------------------------


def test_bytes_round_trip_and_overwrite(store):
    store.put_bytes("a/b/obj.bin", b"first")
    assert store.get_bytes("a/b/obj.bin") == b"first"
    store.put_bytes("a/b/obj.bin", b"second, longer")
    assert store.get_bytes("a/b/obj.bin") == b"second, longer"
    assert store.size("a/b/obj.bin") == len(b"second, longer")


def test_create_bytes_creates_only_once(store):
    assert store.create_bytes("claims/000001", b"mine") is True
    assert store.create_bytes("claims/000001", b"theirs") is False
    assert store.get_bytes("claims/000001") == b"mine"
    store.put_bytes("claims/000001", b"renewed")  # a plain put still replaces it
    assert store.get_bytes("claims/000001") == b"renewed"


def test_concurrent_creates_have_exactly_one_winner(store):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: store.create_bytes("race", str(i).encode()), range(8)))
    assert wins.count(True) == 1
    assert store.get_bytes("race") == str(wins.index(True)).encode()


def test_empty_object_round_trips(store):
    store.put_bytes("empty", b"")
    assert store.exists("empty")
    assert store.get_bytes("empty") == b""
    assert store.size("empty") == 0


def test_file_round_trip_streams_to_new_folders(store, tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(300_000))
    store.put_file("videos/in.bin", source, content_type="application/octet-stream")
    dest = tmp_path / "deep" / "er" / "out.bin"
    assert store.get_file("videos/in.bin", dest) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert temp_files(tmp_path / "deep") == []


def test_open_read_streams_in_pieces(store):
    store.put_bytes("s/x", b"0123456789")
    with store.open_read("s/x") as stream:
        assert stream.read(4) == b"0123"
        assert stream.read() == b"456789"


def test_exists_and_size(store):
    assert not store.exists("k/v")
    store.put_bytes("k/v", b"12345")
    assert store.exists("k/v")
    assert store.size("k/v") == 5
    assert not store.exists("k")  # a folder is not an object


# --- listing and deleting -----------------------------------------------------------------


def test_list_is_recursive_sorted_and_string_prefixed(store):
    keys = ["b/2", "a/1", "ab/3", "a/z/9", "c", "a-b/4"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("a/")) == ["a/1", "a/z/9"]
    assert list(store.list("a")) == ["a-b/4", "a/1", "a/z/9", "ab/3"]
    assert list(store.list("a/z")) == ["a/z/9"]
    assert list(store.list("nothing/")) == []


def test_local_list_ignores_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("d/real", b"1")
    (tmp_path / "d" / f"{TEMP_PREFIX}leftover").write_bytes(b"half")
    (tmp_path / f"{TEMP_PREFIX}dir").mkdir()
    (tmp_path / f"{TEMP_PREFIX}dir" / "inner").write_bytes(b"half")
    assert list(store.list()) == ["d/real"]


def test_delete_is_idempotent(store):
    store.put_bytes("x/y", b"1")
    store.delete("x/y")
    assert not store.exists("x/y")
    store.delete("x/y")
    store.delete("never/was")
    assert list(store.list()) == []


def test_delete_prefix_removes_only_that_prefix(store):
    for key in ["job/1/a", "job/1/b/c", "job/10/a", "other"]:
        store.put_bytes(key, b".")
    assert store.delete_prefix("job/1/") == 2
    assert list(store.list()) == ["job/10/a", "other"]
    assert store.delete_prefix("job/1/") == 0
    with pytest.raises(ValueError, match="non-empty"):
        store.delete_prefix("")


# --- errors -------------------------------------------------------------------------------


def test_missing_key_raises_object_not_found(store, tmp_path):
    dest = tmp_path / "dl" / "missing.bin"
    for operation in (
        lambda: store.get_bytes("no/such"),
        lambda: store.open_read("no/such"),
        lambda: store.size("no/such"),
        lambda: store.get_file("no/such", dest),
        lambda: store.presigned_url("no/such"),
    ):
        with pytest.raises(ObjectNotFound) as raised:
            operation()
        assert isinstance(raised.value, KeyError)
        assert raised.value.key == "no/such"
        assert "no/such" in str(raised.value)
    assert not dest.exists()
    assert temp_files(tmp_path) == []


INVALID_KEYS = [
    "",
    "/etc/passwd",
    "../escape",
    "a/../../b",
    "..",
    "./a",
    "a//b",
    "a/",
    "a\\b",
    "a/\x00b",
    "line\nbreak",
    f"a/{TEMP_PREFIX}x",
    "k" * 1025,
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_rejected(store, key):
    for operation in (
        lambda: store.put_bytes(key, b"1"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.size(key),
    ):
        with pytest.raises(ValueError, match="invalid object key"):
            operation()
    assert list(store.list()) == []


@pytest.mark.parametrize("prefix", ["/a", "../", "a/../", "a//"])
def test_invalid_list_prefixes_are_rejected(store, prefix):
    with pytest.raises(ValueError, match="invalid key prefix"):
        store.list(prefix)


def test_local_keys_cannot_escape_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError):
        store.put_bytes("../outside", b"1")
    assert not (tmp_path / "outside").exists()


# --- atomicity ----------------------------------------------------------------------------


def test_failed_write_leaves_no_object_and_keeps_the_old_one(store, tmp_path):
    with pytest.raises(ConnectionResetError):
        store.put_stream("new", FailingStream(200_000))
    assert not store.exists("new")
    store.put_bytes("old", b"previous")
    with pytest.raises(ConnectionResetError):
        store.put_stream("old", FailingStream(200_000))
    assert store.get_bytes("old") == b"previous"
    assert list(store.list()) == ["old"]
    if isinstance(store, LocalStore):
        assert temp_files(store.root) == []


def test_local_crash_mid_write_leaves_only_an_ignored_temp_file(tmp_path):
    # The writer process dies (no cleanup runs) halfway through the data.
    script = textwrap.dedent(
        f"""
        import io, os
        from serve.storage import LocalStore

        class Dying(io.RawIOBase):
            sent = 0
            def readable(self):
                return True
            def readinto(self, buffer):
                if self.sent >= 3 << 20:
                    os._exit(17)
                buffer[:65536] = b"y" * 65536
                self.sent += 65536
                return 65536

        LocalStore({str(tmp_path)!r}).put_stream("v/frames.npz", Dying())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 17
    leftovers = temp_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size >= 1 << 20
    store = LocalStore(tmp_path)
    assert not store.exists("v/frames.npz")
    assert list(store.list()) == []


# --- S3 specifics -------------------------------------------------------------------------


def test_multipart_upload_above_threshold_round_trips(moto_s3, tmp_path):
    store = moto_s3.store(multipart_threshold=MiB, multipart_chunksize=5 * MiB)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MiB + 123))  # S3 parts are >= 5 MiB: two parts
    store.put_file("big.bin", big)
    head = store.client.head_object(Bucket=store.bucket, Key=store.full_key("big.bin"))
    assert head["ETag"].strip('"').endswith("-2")
    assert store.size("big.bin") == big.stat().st_size
    dest = store.get_file("big.bin", tmp_path / "back.bin")
    assert dest.read_bytes() == big.read_bytes()


def test_small_file_uses_a_single_put(moto_s3, tmp_path):
    store = moto_s3.store(multipart_threshold=MiB)
    small = tmp_path / "small.bin"
    small.write_bytes(b"s" * 1000)
    store.put_file("small.bin", small)
    head = store.client.head_object(Bucket=store.bucket, Key=store.full_key("small.bin"))
    assert "-" not in head["ETag"]


def test_failed_multipart_upload_is_aborted(moto_s3):
    store = moto_s3.store(multipart_threshold=MiB, multipart_chunksize=5 * MiB)
    with pytest.raises(ConnectionResetError):
        store.put_stream("broken.bin", FailingStream(7 * MiB))
    assert not store.exists("broken.bin")
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    assert uploads.get("Uploads", []) == []


def test_presigned_url_downloads_without_credentials(moto_s3):
    store = moto_s3.store()
    store.put_bytes("result/out.mp4", b"\x00\x01video bytes")
    url = store.presigned_url("result/out.mp4", expires_s=300)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"\x00\x01video bytes"


def test_local_presigned_url_is_a_file_uri(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("r/out.mp4", b"local video")
    url = store.presigned_url("r/out.mp4")
    assert url.startswith("file://")
    assert Path(urlparse(url).path).read_bytes() == b"local video"


def test_s3_prefix_isolates_stores_and_shows_in_uris(moto_s3):
    first, second = moto_s3.store(), moto_s3.store()
    first.put_bytes("shared/name", b"1")
    assert not second.exists("shared/name")
    assert list(second.list()) == []
    assert first.uri("shared/name") == f"s3://{moto_s3.bucket}/{first.prefix}/shared/name"
    full = moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket, Prefix=first.prefix)
    assert [entry["Key"] for entry in full["Contents"]] == [f"{first.prefix}/shared/name"]


def test_s3_content_type_is_stored(moto_s3):
    store = moto_s3.store()
    store.put_bytes("m.json", b"{}", content_type="application/json")
    head = store.client.head_object(Bucket=store.bucket, Key=store.full_key("m.json"))
    assert head["ContentType"] == "application/json"


# --- URIs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my.bucket-1/videos/in.mp4", ("my.bucket-1", "videos/in.mp4")),
        ("s3://bkt/prefix/", ("bkt", "prefix")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "bucket/key",
        "S3://bucket/key",
        "https://bucket.s3.amazonaws.com/key",
        "s3://",
        "s3:///key",
        "s3://Bucket/key",
        "s3://b/key",
        "s3://bucket_name/key",
        "s3://-bucket/key",
        "s3://bucket/../other",
        "s3://bucket/a//b",
        "s3://bucket/key?versionId=1",
        "s3://bucket/key#frag",
        "s3://bucket/a key",
    ],
)
def test_parse_s3_uri_rejects_malformed(uri):
    with pytest.raises(ValueError):
        parse_s3_uri(uri)


def test_open_store_picks_the_backend(tmp_path, moto_s3):
    local = open_store(str(tmp_path / "s"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "s").resolve()
    assert isinstance(open_store(local.uri()), LocalStore)
    assert open_store(local.uri()).root == local.root
    remote = open_store(f"s3://{moto_s3.bucket}/some/prefix", s3_endpoint_url=moto_s3.endpoint_url)
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.prefix) == (moto_s3.bucket, "some/prefix")
    remote.put_bytes("k", b"v")
    assert remote.get_bytes("k") == b"v"
    for bad in ("", "http://example.com/x", "file://otherhost/x"):
        with pytest.raises(ValueError):
            open_store(bad)


def test_job_inputs_and_weights_are_fetched_from_s3_by_uri(moto_s3, tmp_path):
    from deployments.model_loading import fetch_s3_file
    from deployments.video import InputLimits
    from serve.cache import ArtifactCache
    from serve.stages import StageContext

    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key="inputs/clip.mp4", Body=b"video")
    uri = f"s3://{moto_s3.bucket}/inputs/clip.mp4"
    ctx = StageContext(
        ArtifactCache(LocalStore(tmp_path / "store")),
        InputLimits(),
        s3_endpoint_url=moto_s3.endpoint_url,
    )
    assert ctx.fetch_input(uri, tmp_path / "input").read_bytes() == b"video"
    fetched = fetch_s3_file(uri, tmp_path / "w", endpoint_url=moto_s3.endpoint_url)
    assert fetched.read_bytes() == b"video"
    with pytest.raises(ValueError, match="one object"):
        fetch_s3_file(f"s3://{moto_s3.bucket}/inputs/", tmp_path / "x")
