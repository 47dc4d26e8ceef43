"""kfp.local's DockerRunner for `make run-pipeline RUNNER=docker`: every step runs in the project image.

The containers see what the steps need at the same paths as the host: the datasets (read-only), and the
state directory ($SLICEFM_HOME: the KFP pipeline root, the MLflow database and its artifacts) read-write.
They run as the image's user (uid 1000, gid 0) when the host runs as root, else as the host's uid with gid 0,
so the files they write stay usable on the host. No network unless MLflow or the store is a URL (then the
host's, which here means loopback only).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_UID = 1000  # the image's user (docker/Dockerfile.deps)


def ensure_engine() -> str:
    """DOCKER_HOST of a Docker Engine that answers (docker/engine.sh starts one when none does)."""
    done = subprocess.run(
        [str(ROOT / "docker" / "engine.sh"), "start"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"no Docker Engine: {done.stderr.strip()}")
    host = done.stdout.strip().splitlines()[-1]
    os.environ["DOCKER_HOST"] = host
    return host


def require_image(image: str) -> None:
    """Stop with the command to run when the project image was never built here (nothing can be pulled)."""
    import docker

    client = docker.from_env()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise SystemExit(f"image {image} not found: build it with `make images`") from None
    finally:
        client.close()


def container_user(state: Path) -> str:
    """The uid:gid the steps run as. As root: the image's user, whose group is 0 (the OpenShift convention),
    so the state directory's folders (and its SQLite files) become group-writable, and this process's umask
    002 keeps what kfp.local creates for each run (root-owned run folders) writable by the steps too.
    Earlier runs' outputs are only read: the walk does not enter them."""
    uid = os.getuid()
    if uid != 0:
        return f"{uid}:0"
    os.umask(0o002)
    pipeline_root = state / "kfp"
    for folder, subfolders, files in os.walk(state):
        here = Path(folder)
        here.chmod(here.stat().st_mode | 0o020)
        if here == pipeline_root:
            subfolders.clear()
        for name in files:
            if name.startswith("mlflow.db"):  # the tracking database (and its journal) is written in place
                path = here / name
                path.chmod(path.stat().st_mode | 0o020)
    return f"{IMAGE_UID}:0"


def docker_runner(
    state: Path, read_only: Iterable[Path], environment: Mapping[str, str], network: bool
):  # noqa: ANN201 - kfp.local.DockerRunner
    """A DockerRunner with the state directory and the datasets mounted at their host paths."""
    from docker.types import Mount
    from kfp import local

    mounts = [Mount(target=str(state), source=str(state), type="bind")]
    mounts += [Mount(target=str(p), source=str(p), type="bind", read_only=True) for p in sorted(set(read_only))]
    return local.DockerRunner(
        user=container_user(state),
        environment=dict(environment),
        mounts=mounts,
        network_mode="host" if network else "none",
    )
