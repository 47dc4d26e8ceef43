"""The project image for real: built with `make images`' script, run as uid 1000 with a read-only root and no
network, the same results as the host, and the whole pipeline under kfp.local's DockerRunner.

The Docker Engine comes from docker/engine.sh (started here when none answers, stopped again after); the
image is built once per session, reusing the dependency image, layer cache and wheelhouse when present.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
IMAGE = f"slicefm:{VERSION}"
KEY = "container-test-key-0123456789abcdef"


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[str]:
    """DOCKER_HOST of a running Docker Engine; one this fixture started is stopped at the end."""
    done = subprocess.run([str(ROOT / "docker" / "engine.sh"), "start"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    host = done.stdout.strip().splitlines()[-1]
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host
    yield host
    if "started dockerd" in done.stderr:
        subprocess.run([str(ROOT / "docker" / "engine.sh"), "stop"], check=False)
    if previous is None:
        os.environ.pop("DOCKER_HOST", None)
    else:
        os.environ["DOCKER_HOST"] = previous


@pytest.fixture(scope="session")
def project_image(docker_engine: str) -> str:
    """The image `make images` builds (docker/build-images.sh), tagged slicefm:<version>[-test]."""
    env = {**os.environ, "TAG": "test", "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    done = subprocess.run(
        [str(ROOT / "docker" / "build-images.sh")], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"{IMAGE}-test" in done.stdout
    return IMAGE


def _run_in_image(image: str, *command: str, mounts: dict[Path, str] | None = None, **env: str) -> str:
    """Run as uid 1000 (gid 0) with a read-only root filesystem and no network; returns stdout."""
    args = ["run", "--rm", "--read-only", "--network", "none", "--user", "1000:0", "--tmpfs", "/tmp"]
    for host, target in (mounts or {}).items():
        args += ["-v", f"{host}:{target}"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    done = docker(*args, image, *command, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_image_runs_the_cli_as_uid_1000_read_only_offline(project_image):
    from slicefm.preprocess.resize import resize_kernel

    probe = "from slicefm.preprocess.resize import resize_kernel; print('kernel', resize_kernel() is not None)"
    out = _run_in_image(project_image, "sh", "-c", f'id -u; id -g; slicefm --help; pip check; python -c "{probe}"')
    uid, gid, *rest = out.splitlines()
    assert (uid, gid) == ("1000", "0")
    assert "usage: slicefm" in out and "No broken requirements found." in out
    # The image has no compiler: the host-built wheel brings the C resize kernel when the host has it.
    assert f"kernel {resize_kernel() is not None}" in out
    labels = yaml.safe_load(docker("image", "inspect", "-f", "{{json .Config.Labels}}", project_image).stdout)
    assert labels["org.opencontainers.image.version"] == VERSION
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert labels["org.opencontainers.image.revision"] == commit.strip()
    assert docker("image", "inspect", "-f", "{{.Config.User}}", project_image).stdout.strip() == "1000"


def test_sources_are_a_layer_of_their_own(project_image):
    """The dependency image is the base; the sources add a few MB, so a code change rebuilds only them."""

    def layer_sizes(image: str) -> list[int]:
        return [int(s) for s in docker("history", "--format", "{{.Size}}", "--human=false", image).stdout.split()]

    labels = yaml.safe_load(docker("image", "inspect", "-f", "{{json .Config.Labels}}", project_image).stdout)
    deps = labels["org.opencontainers.image.base.name"]
    assert deps.startswith("slicefm-deps:")
    ours, base = layer_sizes(project_image), layer_sizes(deps)
    added = ours[: len(ours) - len(base)]
    assert added and sum(added) < 50e6 and sum(base) > 1e9, (added, sum(base))


def test_ingest_and_preprocess_in_the_image_equal_the_host(project_image, tmp_path):
    from slicefm.edge.cli import main as cli_main
    from slicefm.phantom.dataset import generate_dataset

    src = generate_dataset(tmp_path / "src", 3, "dicom", seed=4, shape_xy=64)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"ingest": {"workers": 1}, "preprocess": {"size": 48, "workers": 1}}))
    host, box = tmp_path / "host", tmp_path / "box"
    box.mkdir(mode=0o777)
    box.chmod(0o777)  # the container's uid 1000 writes here
    os.environ["SLICEFM_PSEUDONYM_KEY"] = KEY
    try:
        assert cli_main(["ingest", "--source", str(src), "--out", str(host / "ing"), "--config", str(config)]) == 0
        assert cli_main(["preprocess", "--scans", str(host / "ing"), "--out", str(host / "pre"), "--config", str(config)]) == 0
    finally:
        del os.environ["SLICEFM_PSEUDONYM_KEY"]
    script = (
        "slicefm ingest --source /data/src --out /data/box/ing --config /data/config.yaml && "
        "slicefm preprocess --scans /data/box/ing --out /data/box/pre --config /data/config.yaml"
    )
    mounts = {src: "/data/src:ro", config: "/data/config.yaml:ro", box: "/data/box"}
    _run_in_image(project_image, "sh", "-c", script, mounts=mounts, SLICEFM_PSEUDONYM_KEY=KEY)
    arrays = sorted(p.relative_to(host) for p in host.rglob("*.npy"))
    assert len([a for a in arrays if a.parts[1] == "volumes"]) == 3 and any(a.parts[0] == "pre" for a in arrays)
    assert arrays == sorted(p.relative_to(box) for p in box.rglob("*.npy"))
    for rel in arrays:  # canonical volumes and slice stacks, byte for byte
        assert (host / rel).read_bytes() == (box / rel).read_bytes(), rel
    assert np.load(box / arrays[0]).size > 0


def test_pipeline_runs_every_step_in_the_image(project_image, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines import runner
    from slicefm.data.pseudonym import KEY_ENV
    from slicefm.edge.tracking.pipeline_runs import child_runs, find_parent_run
    from tests.pipeline.conftest import local_run_env, tiny_pipeline_config

    config_path = tiny_pipeline_config(tmp_path, external=False)
    tracking = local_run_env(tmp_path, monkeypatch)
    monkeypatch.setenv(KEY_ENV, "")  # run_local exports the key for its steps: undone after the test
    assert runner.run_local(config_path, run_name="in-docker", runner="docker") == 0
    parent = find_parent_run(tracking, "pipeline-test", "in-docker")
    assert parent.info.status == "FINISHED"
    stages = {r.data.tags["slicefm.stage"]: r for r in child_runs(tracking, parent.info.run_id)}
    assert {"ingest", "preprocess", "pretrain", "extract", "extract-random", "evaluate"} <= set(stages)
    assert all(r.info.status == "FINISHED" for r in stages.values())
    assert stages["pretrain"].data.tags["slicefm.registered_model"] == "t-encoder"
    assert MlflowClient(tracking).get_registered_model("t-encoder").name == "t-encoder"
    results = Path(stages["evaluate"].data.tags["slicefm.output_uri"]) / "results.json"
    assert results.exists()
    # The steps ran in the image, as its user: every output file belongs to uid 1000 (the test runs as root)
    # or to this user.
    owners = {p.stat().st_uid for p in Path(stages["ingest"].data.tags["slicefm.output_uri"]).rglob("*")}
    assert owners == ({1000} if os.getuid() == 0 else {os.getuid()})
