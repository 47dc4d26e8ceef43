"""Bring a dataset into a pipeline step, and name the version of what the step actually read.

On a cluster a step cannot see the submitting checkout's `data/`. The ingest step takes one of:
- a path the pod sees (a mounted volume): read as is, the version as given;
- `s3://bucket/prefix`: every object under the prefix is downloaded into the step's workspace; the version is
  `s3-sha256:<digest of the sorted (key, size, ETag) listing>`, computed from the objects read;
- a DVC revision: the text of `data.dvc` at that revision plus the DVC remote's URL. A throwaway DVC repo in
  the workspace runs a real `dvc pull` (which verifies every file's md5), and the version is
  `dvc-md5:<the .dvc file's md5>`; the source is a path inside the pulled output (`data/demo`).
The workspace is a temporary directory of the pod, or a directory on a mounted volume (a PVC) that keeps
pulled data between steps and runs: an existing complete pull of the same version is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

log = logging.getLogger(__name__)

_DONE = ".slicefm-fetched.json"  # written last: its presence marks a complete fetch of that version


class DataFetchError(RuntimeError):
    """The dataset could not be brought into the step (names the source and the reason)."""


@dataclass(frozen=True)
class FetchedData:
    path: Path  # the dataset root the step reads
    version: str  # what was read: dvc-md5:..., s3-sha256:..., or the version given with a local path


def fetch_source(
    source: str, workspace: Path, *, version: str = "", dvc_file: str = "", dvc_remote: str = ""
) -> FetchedData:
    """The dataset `source` as a local directory under `workspace` (see the module docstring)."""
    if dvc_file:
        return _dvc_pull(source, workspace, dvc_file, dvc_remote)
    if source.startswith("s3://"):
        return _s3_sync(source, workspace)
    if "://" in source:
        raise DataFetchError(f"{source}: unsupported data source (a path, s3://bucket/prefix, or a DVC revision)")
    return FetchedData(Path(source), version)


def dvc_md5(dvc_file: str) -> str:
    """The md5 a .dvc file records for its one output."""
    outs = (yaml.safe_load(dvc_file) or {}).get("outs") or []
    if len(outs) != 1 or not outs[0].get("md5") or not outs[0].get("path"):
        raise DataFetchError("the .dvc file must record exactly one output with its md5 and path")
    return str(outs[0]["md5"])


def _dvc_pull(source: str, workspace: Path, dvc_file: str, remote: str) -> FetchedData:
    if not remote:
        raise DataFetchError("a DVC revision needs the DVC remote's URL (dvc_remote, e.g. s3://bucket/dvcstore)")
    md5 = dvc_md5(dvc_file)
    out_path = PurePosixPath((yaml.safe_load(dvc_file)["outs"][0])["path"])
    rel = PurePosixPath(source)
    if rel.is_absolute() or ".." in rel.parts or rel.parts[: len(out_path.parts)] != out_path.parts:
        raise DataFetchError(f"{source}: with a DVC revision the source is a path inside {out_path}/")
    repo = workspace / f"dvc-{md5.removesuffix('.dir')}"
    if not _complete(repo, md5):
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        (repo / "data.dvc").write_text(dvc_file)
        _dvc(repo, "init", "--no-scm", "-q")
        _dvc(repo, "remote", "add", "-d", "origin", remote)
        if endpoint := os.environ.get("AWS_ENDPOINT_URL"):
            _dvc(repo, "remote", "modify", "origin", "endpointurl", endpoint)
        _dvc(repo, "config", "core.analytics", "false")
        log.info("dvc pull of %s (%s) from %s", out_path, md5, remote)
        _dvc(repo, "pull", "data.dvc")
        (repo / _DONE).write_text(json.dumps({"version": md5}))
    path = repo / rel
    if not path.is_dir():
        raise DataFetchError(f"{source}: not a directory of the pulled {out_path}/ ({md5})")
    return FetchedData(path, f"dvc-md5:{md5}")


def _complete(directory: Path, version: str) -> bool:
    marker = directory / _DONE
    return marker.is_file() and json.loads(marker.read_text()).get("version") == version


def _dvc(repo: Path, *args: str) -> None:
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        raise DataFetchError(f"`dvc {' '.join(args)}` failed in {repo}: {' | '.join(tail)}")


def _s3_sync(source: str, workspace: Path) -> FetchedData:
    """Every object under the prefix, downloaded once per listing digest (a changed object: a new digest)."""
    from slicefm.core.store import S3Store, open_store

    store = open_store(source.rstrip("/"))
    if not isinstance(store, S3Store):
        raise DataFetchError(f"{source}: not an s3:// prefix")
    listing = store.listing()
    if not listing:
        raise DataFetchError(f"{source}: no objects under this prefix")
    digest = hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()
    target = workspace / f"s3-{digest[:16]}"
    if not _complete(target, digest):
        shutil.rmtree(target, ignore_errors=True)
        for key, _, _ in listing:
            store.download_file(key, target / key)
        (target / _DONE).write_text(json.dumps({"version": digest}))
    return FetchedData(target, f"s3-sha256:{digest}")
