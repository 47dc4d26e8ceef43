"""All artifact I/O for every stage: one `Store` interface over a local directory or an S3 prefix.

A location is a URI: a local path (optionally `file://`) or `s3://bucket/prefix`. Keys are '/'-separated
paths relative to the store root. Writes are atomic: a reader never sees a half-written object and a crash
never leaves a partial file under the final name. S3 endpoint and credentials come from the standard AWS
variables through boto3's normal resolution, never from code.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import numpy as np

from slicefm.core.s3_client import (
    _RETRY_STATUSES,
    _backoff_s,
    _boto3_session,
    _client_config,
    _RangeGetter,
    _s3_error,
)

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
# Suffix of in-progress local writes; `list` hides them so readers never pick up a half-written file.
_TMP_SUFFIX = ".slicefm-partial"


class StoreError(RuntimeError):
    """An artifact operation failed for a reason other than a missing key (unreachable endpoint, denied...)."""

    def __init__(self, message: str, uri: str) -> None:
        super().__init__(message)
        self.uri = uri


@dataclass(frozen=True)
class NpyHeader:
    """Layout of a `.npy` file: where the raw C-order data starts and how it is shaped."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def row_nbytes(self) -> int:
        """Bytes of one index along axis 0 (one slice of a [n_slices, ...] stack)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    """Reject keys that are absolute, contain empty/'.'/'..' parts or backslashes (they could escape the root)."""
    if not isinstance(key, str):
        raise TypeError(f"store key must be str, got {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    parts = key.split("/")
    if key == "" or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}: use a relative '/'-separated path without '.' or '..'")
    return key


def _missing(uri: str) -> FileNotFoundError:
    return FileNotFoundError(2, "No such key", uri)


def _short_read(uri: str, start: int, length: int, got: int) -> ValueError:
    return ValueError(f"range [{start}, {start + length}) extends past the end of {uri} (got {got} bytes)")


def _temp_sibling(path: Path) -> Path:
    """A unique hidden name in the same directory, so the final os.replace is an atomic rename."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")


@contextmanager
def _atomic_local_file(path: Path) -> Iterator[IO[bytes]]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`, else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    # os.open with 0o666 lets the umask decide permissions (mkstemp would force 0600, unreadable to
    # other users/pods sharing the volume).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            # Without fsync a power loss after the rename can leave a zero-length file at the final name.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Store(ABC):
    """Artifact store rooted at a local directory or an S3 prefix; keys are relative '/'-separated paths."""

    # -- primitives every backend implements ---------------------------------------------------------
    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically write `data` under `key`, replacing any existing object."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Whole object; FileNotFoundError naming the URI when missing."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes from offset `start`; ValueError when the range passes the end."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key` (directories/prefixes are not objects)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix` (plain string prefix, like S3), recursive, sorted, relative to the root."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Object size in bytes."""

    @abstractmethod
    def delete(self, key: str, missing_ok: bool = False) -> None:
        """Remove an object; FileNotFoundError when missing unless `missing_ok`."""

    @abstractmethod
    def upload_file(self, local_path: str | Path, key: str) -> None:
        """Copy a local file into the store (multipart on S3 above the threshold)."""

    @abstractmethod
    def download_file(self, key: str, local_path: str | Path) -> None:
        """Copy an object to a local file, atomically (temp name, then os.replace)."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Full URI of `key` (the root itself for an empty key)."""

    @abstractmethod
    def child(self, subprefix: str) -> Store:
        """A store rooted at `subprefix` below this one."""

    @abstractmethod
    def open_write(self, key: str) -> AbstractContextManager[IO[bytes]]:
        """Context manager giving a binary file to stream into; committed atomically on clean exit,
        discarded on exception (any previous object stays as it was)."""

    def local_path(self, key: str) -> Path | None:
        """Filesystem path of `key` when the store is local (lets readers memory-map), else None."""
        return None

    # -- conveniences built on the primitives --------------------------------------------------------
    def write_npy(self, key: str, array: np.ndarray) -> None:
        """Save an array in .npy format (C order, no pickle)."""
        with self.open_write(key) as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    def read_npy(self, key: str, mmap: bool = False) -> np.ndarray:
        """Load a .npy array; with `mmap` a local store returns a read-only np.memmap (S3 cannot map)."""
        path = self.local_path(key)
        if path is not None:
            if not path.is_file():
                raise _missing(self.uri(key))
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if mmap:
            logger.debug("%s is remote; reading it into memory instead of memory-mapping", self.uri(key))
        return np.load(io.BytesIO(self.read_bytes(key)), allow_pickle=False)

    def read_npy_header(self, key: str) -> NpyHeader:
        """Parse only the .npy header (two small range reads), e.g. to locate slices in a remote shard."""
        # Format spec: 6-byte magic, 2 version bytes, then a little-endian header length of 2 bytes
        # (version 1.x) or 4 bytes (2.x/3.x), then the header dict padded to a 64-byte boundary.
        prefix = self.read_range(key, 0, 12)
        if prefix[:6] != b"\x93NUMPY":
            raise ValueError(f"{self.uri(key)} is not a .npy file")
        major = prefix[6]
        len_size = 2 if major == 1 else 4
        header_len = int.from_bytes(prefix[8 : 8 + len_size], "little")
        data_offset = 8 + len_size + header_len
        fp = io.BytesIO(self.read_range(key, 0, data_offset))
        version = np.lib.format.read_magic(fp)
        read_header = (
            np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(fp)
        return NpyHeader(tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran_order), data_offset)

    def read_npy_rows(self, key: str, start: int, stop: int, header: NpyHeader | None = None) -> np.ndarray:
        """Rows [start, stop) along axis 0 of a C-order .npy, via one byte-range read (no full download)."""
        header = header or self.read_npy_header(key)
        if header.fortran_order or header.dtype.hasobject:
            raise ValueError(f"{self.uri(key)}: row reads need a C-order array without objects")
        n = header.shape[0] if header.shape else 0
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) out of bounds for {self.uri(key)} with {n} rows")
        raw = self.read_range(
            key, header.data_offset + start * header.row_nbytes, (stop - start) * header.row_nbytes
        )
        return np.frombuffer(raw, dtype=header.dtype).reshape((stop - start, *header.shape[1:]))

    def write_json(self, key: str, obj: Any) -> None:
        """Write JSON (UTF-8, indented, trailing newline)."""
        self.write_bytes(key, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key).decode("utf-8"))

    def write_parquet(self, key: str, df: Any, index: bool = False) -> None:
        """Write a pandas DataFrame as Parquet (pyarrow engine); the index is dropped unless `index`."""
        with self.open_write(key) as f:
            df.to_parquet(f, engine="pyarrow", index=index)

    def read_parquet(self, key: str, columns: list[str] | None = None) -> Any:
        """Read a Parquet file into a pandas DataFrame (optionally only `columns`)."""
        import pandas as pd

        path = self.local_path(key)
        if path is not None and not path.is_file():
            raise _missing(self.uri(key))
        source = path if path is not None else io.BytesIO(self.read_bytes(key))
        return pd.read_parquet(source, engine="pyarrow", columns=columns)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"


class LocalStore(Store):
    """Store rooted at a local directory (created on first write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise _missing(self.uri(key))
        return path

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def child(self, subprefix: str) -> LocalStore:
        return LocalStore(self._path(subprefix.strip("/")))

    @contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        with _atomic_local_file(self._path(key)) as f:
            yield f
        logger.debug("wrote %s", self.uri(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.open_write(key) as f:
            f.write(data)

    def read_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"negative range start={start} length={length}")
        with self._existing(key).open("rb") as f:
            f.seek(start)
            data = f.read(length)
        if len(data) != length:
            raise _short_read(self.uri(key), start, length, len(data))
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            _check_key(prefix.rstrip("/"))
        # Walk only below the directory part of the prefix; the rest is matched as a string prefix.
        base = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        keys: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def delete(self, key: str, missing_ok: bool = False) -> None:
        path = self._path(key)
        if not path.is_file():
            if missing_ok:
                return
            raise _missing(self.uri(key))
        path.unlink()

    def upload_file(self, local_path: str | Path, key: str) -> None:
        with open(local_path, "rb") as src, self.open_write(key) as dst:
            shutil.copyfileobj(src, dst, length=8 * MiB)

    def download_file(self, key: str, local_path: str | Path) -> None:
        src = self._existing(key)
        with _atomic_local_file(Path(local_path)) as dst, src.open("rb") as f:
            shutil.copyfileobj(f, dst, length=8 * MiB)


class S3Store(Store):
    """Store rooted at `s3://bucket/prefix`; endpoint and credentials from the standard AWS variables.

    Every call runs under botocore's `standard` retry mode (`max_attempts` in total, exponential backoff)
    with connect/read timeouts; once retries are exhausted a `StoreError` names the URI and the cause.
    Transfers above `multipart_threshold` use multipart upload / ranged parallel download.

    With `fast_range_reads` (the default) `read_range`, the per-slice hot path, sends a cached presigned
    GET through urllib3 instead of a boto3 `get_object` (~2.5x less client CPU per read: see
    benchmarks/s3_range.py) with the same results, errors, retries and timeouts; boto3 serves what it
    cannot (proxies, redirects, denials, unexpected answers, missing credentials).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        max_attempts: int = 5,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        fast_range_reads: bool = True,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid bucket name {bucket!r}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            _check_key(self.prefix)
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.fast_range_reads = fast_range_reads
        self._client: Any = None
        # Shared with `child` stores; pickles without its pool and URL cache.
        self._ranges = _RangeGetter(max_attempts, connect_timeout_s, read_timeout_s)

    # boto3 clients cannot be pickled; drop it so stores can cross into DataLoader worker processes.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created lazily, thread-safe, shared with `child` stores)."""
        if self._client is None:
            config = _client_config(self.max_attempts, self.connect_timeout_s, self.read_timeout_s)
            self._client = _boto3_session().client("s3", config=config)
        return self._client

    @property
    def endpoint_url(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            # The classic s3transfer manager honours custom endpoints and aborts failed multipart uploads.
            preferred_transfer_client="classic",
        )

    def _full_key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        full = self._full_key(key) if key else self.prefix
        return f"s3://{self.bucket}/{full}" if full else f"s3://{self.bucket}"

    def child(self, subprefix: str) -> S3Store:
        sub = copy.copy(self)  # shares the client: one connection pool per process
        sub.prefix = self._full_key(subprefix.strip("/"))
        return sub

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Translate boto errors: missing key -> FileNotFoundError, the rest -> StoreError naming the URI."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        uri = self.uri(key)
        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise _missing(uri) from exc
            if code == "InvalidRange":
                raise ValueError(f"byte range past the end of {uri}") from exc
            raise StoreError(
                f"S3 request failed while {action} {uri}: {code} {err.get('Message', '')}", uri
            ) from exc
        except BotoConnectionError as exc:
            raise StoreError(
                f"S3 endpoint {self.endpoint_url} unreachable while {action} {uri}: {exc}", uri
            ) from exc
        except HTTPClientError as exc:
            raise StoreError(
                f"S3 connection to {self.endpoint_url} failed while {action} {uri}: {exc}", uri
            ) from exc
        except NoCredentialsError as exc:
            raise StoreError(
                f"no S3 credentials while {action} {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY", uri
            ) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StoreError(f"S3 error while {action} {uri}: {exc}", uri) from exc

    @contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        # Spool in memory up to the multipart threshold, then to a temp file; nothing reaches S3 until
        # the block exits cleanly, so an exception leaves any previous object untouched.
        with tempfile.SpooledTemporaryFile(max_size=self.multipart_threshold) as spool:
            yield spool  # type: ignore[misc]
            n = spool.seek(0, io.SEEK_END)
            spool.seek(0)
            if n <= self.multipart_threshold:
                self.write_bytes(key, spool.read())
            else:
                self._upload_fileobj(spool, key)

    def _upload_fileobj(self, fileobj: IO[bytes], key: str) -> None:
        with self._errors("writing", key):
            self.client.upload_fileobj(
                fileobj, self.bucket, self._full_key(key), Config=self._transfer_config()
            )
        logger.debug("uploaded %s (multipart above %d bytes)", self.uri(key), self.multipart_threshold)

    def write_bytes(self, key: str, data: bytes) -> None:
        if len(data) > self.multipart_threshold:
            self._upload_fileobj(io.BytesIO(data), key)
            return
        with self._errors("writing", key):
            self.client.put_object(Bucket=self.bucket, Key=self._full_key(key), Body=data)
        logger.debug("wrote %s (%d bytes)", self.uri(key), len(data))

    def read_bytes(self, key: str) -> bytes:
        with self._errors("reading", key):
            resp = self.client.get_object(Bucket=self.bucket, Key=self._full_key(key))
            return resp["Body"].read()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"negative range start={start} length={length}")
        if length == 0:
            # "bytes=a-(a-1)" is not a valid HTTP range, so an empty read never reaches S3; still check the key.
            self.size(key)
            return b""
        data = self._fast_range(key, start, length) if self.fast_range_reads else None
        if data is None:
            data = self._boto3_range(key, start, length)
        if len(data) != length:
            raise _short_read(self.uri(key), start, length, len(data))
        return data

    def _boto3_range(self, key: str, start: int, length: int) -> bytes:
        with self._errors("reading", key):
            resp = self.client.get_object(
                Bucket=self.bucket, Key=self._full_key(key), Range=f"bytes={start}-{start + length - 1}"
            )
            return resp["Body"].read()

    def _fast_range(self, key: str, start: int, length: int) -> bytes | None:
        """The range through a presigned GET, or None where boto3 should serve it. A 403 (expired URL,
        refreshed credentials) re-presigns once; connection errors and 5xx are retried with botocore's
        back-off up to `max_attempts` in total, then a StoreError names the URI and the endpoint."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        ranges = self._ranges
        full = self._full_key(key)
        failures, fresh, resigned = 0, False, False
        while True:
            try:
                pool = ranges.pool()
                if pool is None or self.bucket in ranges.redirected:
                    return None
                signed = ranges.url(self.bucket, full, fresh=fresh)
            except BotoCoreError:  # no credentials, bad configuration: boto3 reports it as usual
                return None
            fresh = False
            try:
                resp = ranges.get(pool, signed, start, length)
            except HTTPError as exc:
                failure: Any = exc
            else:
                if resp.status == 206:
                    return resp.data
                if resp.status == 403 and not resigned:
                    fresh = resigned = True
                    continue
                if resp.status not in _RETRY_STATUSES:
                    return self._fast_verdict(key, resp)
                failure = resp
            failures += 1
            if failures >= self.max_attempts:
                raise self._fast_failure(key, failure, failures)
            time.sleep(_backoff_s(failures))

    def _fast_verdict(self, key: str, resp: Any) -> None:
        """Raise what boto3 would for a final non-206 answer that needs no boto3 call (missing key, range
        past the end); return None to let boto3 serve the read (redirects, denials, anything else)."""
        code, _message = _s3_error(resp.data)
        if resp.status == 404 and code == "NoSuchKey":
            raise _missing(self.uri(key))
        if resp.status == 416:
            raise ValueError(f"byte range past the end of {self.uri(key)}")
        if 300 <= resp.status < 400:
            self._ranges.redirected.add(self.bucket)  # another region, say: boto3 follows those
        logger.debug("presigned GET of %s: %d %s; reading it through boto3", self.uri(key), resp.status, code)
        return None

    def _fast_failure(self, key: str, failure: Any, attempts: int) -> StoreError:
        """The StoreError after the last failed attempt (an urllib3 error or a retryable response)."""
        from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, SSLError

        uri, endpoint = self.uri(key), self._ranges.endpoint_url
        if isinstance(failure, (NewConnectionError, ConnectTimeoutError, SSLError)):
            return StoreError(f"S3 endpoint {endpoint} unreachable while reading {uri}: {failure}", uri)
        if isinstance(failure, Exception):
            return StoreError(f"S3 connection to {endpoint} failed while reading {uri}: {failure}", uri)
        code, message = _s3_error(failure.data)
        return StoreError(
            f"S3 request failed while reading {uri}: {code or failure.status} {message} "
            f"(HTTP {failure.status} from {endpoint}, {attempts} attempts)",
            uri,
        )

    def _head(self, key: str) -> dict[str, Any]:
        with self._errors("inspecting", key):
            return self.client.head_object(Bucket=self.bucket, Key=self._full_key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        with self._errors("listing", ""):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                keys.extend(obj["Key"][len(root) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def listing(self, prefix: str = "") -> list[tuple[str, int, str]]:
        """(key, size, ETag) of every object under `prefix`, from the listing alone (no request per object)."""
        root = f"{self.prefix}/" if self.prefix else ""
        rows: list[tuple[str, int, str]] = []
        with self._errors("listing", ""):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                rows.extend((o["Key"][len(root) :], int(o["Size"]), o.get("ETag", "")) for o in page.get("Contents", []))
        return sorted(rows)

    def delete(self, key: str, missing_ok: bool = False) -> None:
        # S3 DeleteObject succeeds on missing keys; check first so both stores behave the same.
        if not missing_ok and not self.exists(key):
            raise _missing(self.uri(key))
        with self._errors("deleting", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full_key(key))

    def upload_file(self, local_path: str | Path, key: str) -> None:
        if not Path(local_path).is_file():
            raise FileNotFoundError(2, "No such file", str(local_path))
        with self._errors("writing", key):
            self.client.upload_file(
                str(local_path), self.bucket, self._full_key(key), Config=self._transfer_config()
            )
        logger.debug("uploaded %s -> %s", local_path, self.uri(key))

    def download_file(self, key: str, local_path: str | Path) -> None:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(dest)
        try:
            with self._errors("reading", key):
                self.client.download_file(
                    self.bucket, self._full_key(key), str(tmp), Config=self._transfer_config()
                )
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.debug("downloaded %s -> %s", self.uri(key), dest)


def open_store(uri: str | Path, **s3_options: Any) -> Store:
    """Store for a URI: `s3://bucket/prefix` -> S3Store (options forwarded), a path or `file://` -> LocalStore."""
    text = str(uri)
    parts = urlsplit(text)
    if parts.scheme == "s3":
        return S3Store(parts.netloc, parts.path, **s3_options)
    if s3_options:
        raise TypeError(f"S3 options {sorted(s3_options)} given for non-S3 location {text}")
    if parts.scheme == "file":
        return LocalStore(Path(parts.path))
    if parts.scheme and "://" in text:
        raise ValueError(f"unsupported store URI scheme {parts.scheme!r} in {text} (use a path or s3://)")
    return LocalStore(Path(text))


@contextmanager
def staged_output(uri: str | Path) -> Iterator[str]:
    """Yield where to write a whole output so that a failure leaves nothing half-written.

    A new local directory is built as a hidden sibling and renamed into place when the block succeeds
    (removed when it fails). An existing directory (resume) or an S3 prefix (no renames) is written in place;
    there every object is still atomic on its own.
    """
    text = str(uri)
    parts = urlsplit(text)
    target = Path(parts.path) if parts.scheme == "file" else Path(text)
    if (parts.scheme and "://" in text and parts.scheme != "file") or target.exists():
        yield text
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    staging.chmod(0o777 & ~mask)  # mkdtemp's 0700 would hide the output from other users and pods
    try:
        yield str(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Rename the finished directory `src` onto `dest` (same filesystem: atomic); an existing `dest` is moved
    aside first and removed only after the rename, and put back if the rename fails."""
    if not dest.exists():
        os.replace(src, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
