"""One behavioural suite run against LocalStore and S3Store (moto's real S3 server over loopback HTTP)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slicefm.core.store import LocalStore, S3Store, Store, StoreError, open_store

MiB = 1024 * 1024
# s3transfer never cuts parts below 5 MiB, so 6 MiB gives a genuine two-part multipart upload.
BIG = 6 * MiB
SMALL_THRESHOLD = 64 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket_uri = request.getfixturevalue("s3_env")
    # A tiny threshold forces the multipart paths; a prefix checks keys come back relative to it.
    return open_store(
        f"{bucket_uri}/runs/r1",
        multipart_threshold=SMALL_THRESHOLD,
        multipart_chunksize=5 * MiB,
        max_attempts=2,
    )


def _raw_s3_keys(store: S3Store) -> list[str]:
    resp = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(obj["Key"] for obj in resp.get("Contents", []))


def _files_on_disk(store: Store) -> list[str]:
    """Every file under a local store's root, temp files included (list() would hide them)."""
    assert isinstance(store, LocalStore)
    return sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())


def test_write_read_roundtrip_and_overwrite(store: Store) -> None:
    store.write_bytes("a/b/c.bin", b"first")
    assert store.read_bytes("a/b/c.bin") == b"first"
    store.write_bytes("a/b/c.bin", b"second, longer")
    assert store.read_bytes("a/b/c.bin") == b"second, longer"
    assert store.size("a/b/c.bin") == len(b"second, longer")
    assert store.exists("a/b/c.bin")
    assert not store.exists("a/b")  # a prefix is not an object, on either backend


def test_read_range(store: Store) -> None:
    data = bytes(range(256)) * 4
    store.write_bytes("blob.bin", data)
    assert store.read_range("blob.bin", 0, 1) == data[:1]
    assert store.read_range("blob.bin", 300, 123) == data[300:423]
    assert store.read_range("blob.bin", len(data) - 5, 5) == data[-5:]
    assert store.read_range("blob.bin", 17, 0) == b""
    with pytest.raises(ValueError, match="blob.bin"):
        store.read_range("blob.bin", len(data) - 5, 10)


def test_list_is_recursive_sorted_and_relative(store: Store) -> None:
    for key in ["z.bin", "a/d.bin", "ab.bin", "a/b/c.bin"]:
        store.write_bytes(key, key.encode())
    assert store.list() == ["a/b/c.bin", "a/d.bin", "ab.bin", "z.bin"]
    assert store.list("a/") == ["a/b/c.bin", "a/d.bin"]
    assert store.list("a") == ["a/b/c.bin", "a/d.bin", "ab.bin"]  # string prefix, as on S3
    assert store.list("a/b/c") == ["a/b/c.bin"]
    assert store.list("nothing/") == []
    sub = store.child("a")
    assert sub.list() == ["b/c.bin", "d.bin"]
    assert sub.read_bytes("b/c.bin") == b"a/b/c.bin"
    assert sub.uri("d.bin") == store.uri("a/d.bin")


def test_delete(store: Store) -> None:
    store.write_bytes("x/y.bin", b"1")
    store.delete("x/y.bin")
    assert not store.exists("x/y.bin")
    assert store.list() == []
    with pytest.raises(FileNotFoundError, match="x/y.bin"):
        store.delete("x/y.bin")
    store.delete("x/y.bin", missing_ok=True)


def test_missing_keys_raise_file_not_found_naming_the_uri(store: Store, tmp_path: Path) -> None:
    uri = store.uri("no/such.bin")
    for call in (
        lambda: store.read_bytes("no/such.bin"),
        lambda: store.read_range("no/such.bin", 0, 4),
        lambda: store.size("no/such.bin"),
        lambda: store.read_npy("no/such.bin"),
        lambda: store.read_parquet("no/such.bin"),
        lambda: store.download_file("no/such.bin", tmp_path / "dl.bin"),
    ):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert uri in str(info.value)
    assert not (tmp_path / "dl.bin").exists()
    assert list(tmp_path.glob("*partial*")) == []


def test_npy_roundtrip_mmap_and_row_ranges(store: Store) -> None:
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 255, size=(9, 5, 6, 3), dtype=np.uint8)
    emb = rng.standard_normal((7, 16)).astype(np.float16)
    store.write_npy("shard-000.npy", stack)
    store.write_npy("emb.npy", emb)

    np.testing.assert_array_equal(store.read_npy("shard-000.npy"), stack)
    mapped = store.read_npy("emb.npy", mmap=True)
    np.testing.assert_array_equal(mapped, emb)
    assert mapped.dtype == np.float16
    # Only a local store can memory-map; S3 falls back to an in-memory array.
    assert isinstance(mapped, np.memmap) == isinstance(store, LocalStore)

    header = store.read_npy_header("shard-000.npy")
    assert header.shape == (9, 5, 6, 3) and header.dtype == np.uint8 and not header.fortran_order
    assert header.row_nbytes == 5 * 6 * 3
    np.testing.assert_array_equal(store.read_npy_rows("shard-000.npy", 2, 5, header), stack[2:5])
    np.testing.assert_array_equal(store.read_npy_rows("emb.npy", 6, 7), emb[6:7])
    with pytest.raises(IndexError):
        store.read_npy_rows("emb.npy", 5, 8)


def test_json_and_parquet(store: Store) -> None:
    meta = {"source": "phantom", "counts": {"scans": 3, "slices": 120}, "note": "Hounsfield – µ", "ok": True}
    store.write_json("dataset.json", meta)
    assert store.read_json("dataset.json") == meta

    df = pd.DataFrame(
        {
            "scan_id": ["s0", "s1", "s2"],
            "n_slices": np.array([40, 41, 39], dtype=np.int32),
            "spacing_z_mm": [1.25, 2.5, 5.0],
            "label": [True, False, True],
        }
    )
    store.write_parquet("scans.parquet", df)
    pd.testing.assert_frame_equal(store.read_parquet("scans.parquet"), df)
    pd.testing.assert_frame_equal(
        store.read_parquet("scans.parquet", columns=["scan_id", "label"]), df[["scan_id", "label"]]
    )


def test_upload_download_multipart(store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    payload = rng.integers(0, 256, size=BIG, dtype=np.uint8).tobytes()
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    store.upload_file(src, "models/encoder.safetensors")
    assert store.size("models/encoder.safetensors") == BIG

    if isinstance(store, S3Store):
        # A multipart object's ETag ends in "-<number of parts>".
        head = store.client.head_object(Bucket=store.bucket, Key="runs/r1/models/encoder.safetensors")
        assert head["ETag"].strip('"').endswith("-2")

    dest = tmp_path / "out" / "encoder.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    store.download_file("models/encoder.safetensors", dest)
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["encoder.safetensors"]  # no temp files left

    # write_bytes above the threshold takes the multipart route too.
    store.write_bytes("big2.bin", payload)
    assert store.read_range("big2.bin", BIG - 100, 100) == payload[-100:]


def test_open_write_is_atomic_and_exception_keeps_old_content(store: Store) -> None:
    store.write_bytes("state.json", b'{"v": 1}')

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.open_write("state.json") as f:
            f.write(b'{"v": 2, "trunc')
            # Mid-write, readers still see the old object and no half-written key.
            assert store.read_bytes("state.json") == b'{"v": 1}'
            assert store.list() == ["state.json"]
            raise Boom
    assert store.read_bytes("state.json") == b'{"v": 1}'

    with pytest.raises(Boom):
        with store.open_write("never.bin") as f:
            f.write(b"x" * 100)
            raise Boom
    assert not store.exists("never.bin")
    assert store.list() == ["state.json"]
    if isinstance(store, LocalStore):
        assert _files_on_disk(store) == ["state.json"]
    else:
        assert _raw_s3_keys(store) == [store.uri("state.json").split("/", 3)[3]]


def test_local_write_leaves_no_temp_files_and_crash_keeps_old(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path / "root")
    store.write_bytes("a/x.bin", b"old")
    store.write_npy("a/y.npy", np.arange(4))
    assert _files_on_disk(store) == ["a/x.bin", "a/y.npy"]

    # A failure after the data is written but before the rename (disk full at fsync, say).
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        store.write_bytes("a/x.bin", b"new content")
    assert store.read_bytes("a/x.bin") == b"old"
    assert _files_on_disk(store) == ["a/x.bin", "a/y.npy"]


def test_local_store_paths(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "r"))
    assert isinstance(store, LocalStore)
    assert store.uri("p/q.npy") == str(tmp_path / "r" / "p" / "q.npy")
    assert store.local_path("p/q.npy") == tmp_path / "r" / "p" / "q.npy"
    assert open_store(f"file://{tmp_path}/r").uri() == str(tmp_path / "r")


def test_open_store_parses_s3_uris() -> None:
    store = open_store("s3://bucket/a/b/", max_attempts=3)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.max_attempts) == ("bucket", "a/b", 3)
    assert store.uri("k.npy") == "s3://bucket/a/b/k.npy"
    assert store.child("c").uri("k") == "s3://bucket/a/b/c/k"
    assert open_store("s3://bucket").uri("k") == "s3://bucket/k"
    assert store.local_path("k") is None
    with pytest.raises(ValueError, match="scheme"):
        open_store("gs://bucket/x")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", ""])
def test_invalid_keys_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        LocalStore(tmp_path).write_bytes(key, b"x")
    with pytest.raises(ValueError, match="invalid store key"):
        S3Store("bucket").uri(key or "a//")


def test_s3_store_pickles_for_worker_processes(s3_env: str) -> None:
    store = open_store(f"{s3_env}/p")
    store.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes("k") == b"v"


def test_failed_multipart_upload_is_aborted(s3_env: str, tmp_path: Path) -> None:
    store = open_store(
        s3_env, multipart_threshold=SMALL_THRESHOLD, multipart_chunksize=5 * MiB, max_concurrency=1
    )
    assert isinstance(store, S3Store)

    class PartLost(Exception):
        pass

    def fail_second_part(params: dict, **_: object) -> None:
        if params.get("PartNumber") == 2:
            raise PartLost("simulated network loss on part 2")

    store.client.meta.events.register("provide-client-params.s3.UploadPart", fail_second_part)
    src = tmp_path / "big.bin"
    src.write_bytes(b"\x01" * BIG)
    with pytest.raises(PartLost):
        store.upload_file(src, "shard.npy")
    assert not store.exists("shard.npy")
    # The incomplete upload was aborted, so no orphaned parts keep costing storage.
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_s3_unreachable_raises_store_error_quickly(monkeypatch, closed_port: int, requested_sleeps) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = S3Store("b", "", max_attempts=2, connect_timeout_s=1)
    assert store.endpoint_url == endpoint
    with pytest.raises(StoreError) as info:
        store.write_bytes("k", b"data")
    assert len(requested_sleeps) == 1, requested_sleeps  # max_attempts=2: one back-off, then the error
    message = str(info.value)
    assert message.startswith(f"S3 endpoint {endpoint} unreachable while writing s3://b/k: ")
    assert info.value.uri == "s3://b/k"
    with pytest.raises(StoreError, match="unreachable while reading s3://b/k"):
        store.read_bytes("k")


def test_s3_missing_bucket_is_a_store_error(s3_env: str, tmp_path: Path) -> None:
    store = open_store("s3://no-such-bucket-0f3a/p", max_attempts=1)
    with pytest.raises(StoreError, match=r"writing s3://no-such-bucket-0f3a/p/k: NoSuchBucket"):
        store.write_bytes("k", b"x")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    with pytest.raises(StoreError, match="s3://no-such-bucket-0f3a/p/k"):
        store.upload_file(src, "k")
