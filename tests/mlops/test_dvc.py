"""`make data-push` / `make data-pull` against a real S3 protocol server (moto on loopback).

The commands run are the ones the Makefile prints (`make -n`), executed in a tiny throwaway DVC repo,
so the test follows the targets if they change.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
DVC = str(VENV / "bin" / "dvc")


def _dvc(repo: Path, *args: str) -> str:
    res = subprocess.run([DVC, *args], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _make_commands(target: str, *variables: str) -> list[list[str]]:
    """The dvc command lines `make -n <target>` would run (setup lines, if any, are left out)."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={VENV}", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cmds = [shlex.split(ln) for ln in out.splitlines() if ln.startswith(DVC + " ")]
    assert cmds, f"make -n {target} printed no dvc command:\n{out}"
    return cmds


def _run(repo: Path, cmds: list[list[str]]) -> None:
    for cmd in cmds:
        res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        assert res.returncode == 0, f"{shlex.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"


@pytest.fixture
def dvc_repo(tmp_path: Path, s3_env: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`dvc init --no-scm` repo with data/ tracked in data.dvc and two S3 remotes on the moto server."""
    for var, sub in (("DVC_GLOBAL_CONFIG_DIR", "dvc-global"), ("DVC_SITE_CACHE_DIR", "dvc-site")):
        monkeypatch.setenv(var, str(tmp_path / sub))  # keep the developer's DVC config and caches out
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = tmp_path / "repo"
    (repo / "data" / "scans").mkdir(parents=True)
    (repo / "data" / "scans" / "a.npy").write_bytes(os.urandom(200_000))
    (repo / "data" / "scans" / "b.npy").write_bytes(os.urandom(1_000))
    (repo / "data" / "labels.csv").write_text("scan_ref,label\nS1,1\nS2,0\n")
    _dvc(repo, "init", "--no-scm", "-q")
    _dvc(repo, "add", "-q", "data")
    for name, default in (("storage", True), ("archive", False)):
        _dvc(repo, "remote", "add", *(["-d"] if default else []), name, f"{s3_env}/dvc-{name}")
        _dvc(repo, "remote", "modify", name, "endpointurl", s3_server)
    return repo


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _wipe(repo: Path) -> None:
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")


def _objects(s3_admin, s3_env: str, prefix: str) -> list[str]:
    resp = s3_admin.list_objects_v2(Bucket=s3_env.removeprefix("s3://"), Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


def test_data_push_pull_default_remote(dvc_repo: Path, s3_env: str, s3_admin) -> None:
    before = _snapshot(dvc_repo / "data")
    _run(dvc_repo, _make_commands("data-push"))
    assert len(_objects(s3_admin, s3_env, "dvc-storage/")) == 4  # 3 files + the .dir listing
    assert _objects(s3_admin, s3_env, "dvc-archive/") == []
    _wipe(dvc_repo)
    _run(dvc_repo, _make_commands("data-pull"))
    assert _snapshot(dvc_repo / "data") == before


def test_data_push_pull_named_remote(dvc_repo: Path, s3_env: str, s3_admin) -> None:
    before = _snapshot(dvc_repo / "data")
    push = _make_commands("data-push", "DVC_REMOTE=archive")
    assert ["--remote", "archive"] == push[0][2:4]
    _run(dvc_repo, push)
    assert len(_objects(s3_admin, s3_env, "dvc-archive/")) == 4
    _wipe(dvc_repo)
    _run(dvc_repo, _make_commands("data-pull", "DVC_REMOTE=archive"))
    assert _snapshot(dvc_repo / "data") == before
