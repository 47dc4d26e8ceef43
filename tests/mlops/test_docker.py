"""The Dockerfiles, .dockerignore and `make images` checked statically (no container engine here)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "gpu": ROOT / "docker" / "Dockerfile.gpu"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, op: str) -> list[str]:
        return [a for o, a in self.instructions if o == op]


def parse_dockerfile(path: Path) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(global instructions before the first FROM, stages); continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for text in logical:
        op, _, arg = text.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arg.strip(), re.IGNORECASE)
            assert m, f"{path}: cannot parse FROM {arg}"
            stages.append(Stage(m.group(1), m.group(2)))
        elif stages:
            stages[-1].instructions.append((op, arg.strip()))
        else:
            preamble.append((op, arg.strip()))
    return preamble, stages


def _labels(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in stage.args("LABEL"):
        for token in shlex.split(arg):
            key, _, value = token.partition("=")
            out[key] = value
    return out


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[tuple[str, str]], list[Stage]]:
    preamble, stages = parse_dockerfile(DOCKERFILES[request.param])
    return request.param, preamble, stages


def test_multi_stage_with_python_311(dockerfile) -> None:
    _, preamble, stages = dockerfile
    assert len(stages) >= 2, "build and runtime stages"
    build, runtime = stages[0], stages[-1]
    assert build.name == "build"
    assert "--from=build" in " ".join(runtime.args("COPY")), "runtime copies the built venv"
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in preamble
    assert {s.base for s in stages} == {"${PYTHON_IMAGE}"}, "same Python in both stages (venv symlinks)"


def test_runtime_runs_as_non_root(dockerfile) -> None:
    runtime = dockerfile[2][-1]
    users = runtime.args("USER")
    assert users, "runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root UID (runAsNonRoot can verify it)"


def test_oci_labels_from_build_args(dockerfile) -> None:
    runtime = dockerfile[2][-1]
    args = {a.split("=")[0] for a in runtime.args("ARG")}
    assert {"VERSION", "GIT_COMMIT", "IMAGE"} <= args
    labels = _labels(runtime)
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${GIT_COMMIT}"
    assert labels["org.opencontainers.image.title"].startswith("slicefm")
    env = " ".join(runtime.args("ENV"))
    assert "SLICEFM_GIT_COMMIT=${GIT_COMMIT}" in env and "SLICEFM_IMAGE=${IMAGE}" in env


def test_lock_installed_at_build_time_without_pip_at_start(dockerfile) -> None:
    _, _, stages = dockerfile
    build, runtime = stages[0], stages[-1]
    build_runs = " ".join(build.args("RUN"))
    assert "requirements.lock" in " ".join(build.args("COPY"))
    assert re.search(r"pip install --no-deps -r /tmp/rest\.txt", build_runs)
    assert "pip install --no-deps /src" in build_runs and "pip check" in build_runs
    assert "pip" not in " ".join(runtime.args("RUN")), "no installs in the runtime stage"
    for op in ("ENTRYPOINT", "CMD"):
        for arg in (a for s in stages for a in s.args(op)):
            assert "pip" not in arg, f"{op} must not install anything at pod start: {arg}"


def test_torch_builds(dockerfile) -> None:
    flavour, _, stages = dockerfile
    build = stages[0]
    index = next(a for a in build.args("ARG") if a.startswith("TORCH_INDEX_URL="))
    runs = " ".join(build.args("RUN"))
    if flavour == "cpu":
        assert index.endswith("/whl/cpu")
        assert "^nvidia-" in runs and "triton" in runs, "CUDA wheels dropped from the CPU image"
    else:
        assert re.search(r"download\.pytorch\.org/whl/cu1\d+$", index)
        cuda = re.search(r"^nvidia-cuda-runtime==(\d+)\.", (ROOT / "requirements.lock").read_text(), re.M)
        assert cuda and index.endswith(f"cu{cuda.group(1)}0"), "torch index matches the lock's CUDA wheels"
        assert "NVIDIA_VISIBLE_DEVICES=all" in " ".join(stages[-1].args("ENV"))
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.14\.1$", lock, re.M), "the images install the pinned torch"


def test_lock_split_installs_every_pin_once(dockerfile) -> None:
    """Apply the Dockerfile's own grep patterns to requirements.lock: torch/torchvision from the PyTorch
    index, everything else from PyPI, and only the CUDA wheels left out of the CPU image."""
    flavour, _, stages = dockerfile
    runs = " ".join(stages[0].args("RUN"))
    keep = re.search(r"grep -E '([^']+)' /tmp/requirements\.lock > /tmp/torch\.txt", runs)
    drop = re.search(r"grep -vE '([^']+)' /tmp/requirements\.lock > /tmp/rest\.txt", runs)
    assert keep and drop, "lock split into torch.txt and rest.txt"
    lock = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines() if ln.strip()]
    torch_pins = [ln for ln in lock if re.search(keep.group(1), ln)]
    rest = [ln for ln in lock if not re.search(drop.group(1), ln)]
    assert sorted(torch_pins) == ["torch==2.14.1", "torchvision==0.29.1"]
    assert not set(torch_pins) & set(rest)
    left_out = set(lock) - set(rest) - set(torch_pins)
    if flavour == "cpu":
        assert left_out and all(ln.startswith(("nvidia-", "triton==")) for ln in left_out)
    else:
        assert not left_out, "the GPU image installs the whole lock"


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "data/demo/scan.dcm", ".slicefm/pseudonym.key", ".slicefm/mlflow.db",
     ".dvc/cache/files/md5/ab/cd", "mlruns/0/meta.yaml", "slicefm/__pycache__/cli.cpython-311.pyc",
     "out/run/x.npy", "tests/conftest.py"],
)  # fmt: skip
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert _ignored(path, _dockerignore())


def test_dockerignore_keeps_what_the_dockerfiles_copy() -> None:
    patterns = _dockerignore()
    for path in DOCKERFILES.values():
        _, stages = parse_dockerfile(path)
        for arg in (a for s in stages for a in s.args("COPY") if not a.startswith("--from")):
            for src in arg.split()[:-1]:
                assert (ROOT / src).exists(), f"{path.name}: COPY source {src} missing"
                files = [src] if (ROOT / src).is_file() else [
                    p.relative_to(ROOT).as_posix() for p in (ROOT / src).rglob("*.py") if "__pycache__" not in p.parts
                ]  # fmt: skip
                assert files and not [f for f in files if _ignored(f, patterns)], (
                    f"{src} excluded from context"
                )


def _make(*args: str) -> list[str]:
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ln for ln in out.splitlines() if ln.startswith("docker ")]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_make_images_builds_both_tags_with_build_args() -> None:
    lines = _make("images", "IMAGE_REGISTRY=registry.example.org/team", "TAG=t1")
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    commit = _git("rev-parse", "HEAD")
    assert len(lines) == 2
    for line, (dockerfile, repo) in zip(
        lines, [("docker/Dockerfile", "slicefm"), ("docker/Dockerfile.gpu", "slicefm-gpu")], strict=True
    ):
        argv = shlex.split(line)
        assert argv[:2] == ["docker", "build"] and argv[-1] == "."
        assert argv[argv.index("-f") + 1] == dockerfile
        assert argv[argv.index("-t") + 1] == f"registry.example.org/team/{repo}:t1"
        build_args = {argv[i + 1] for i, a in enumerate(argv) if a == "--build-arg"}
        assert {
            f"VERSION={version}",
            f"GIT_COMMIT={commit}",
            f"IMAGE=registry.example.org/team/{repo}:t1",
        } <= (build_args)


def test_make_images_tag_defaults_to_git_short_commit() -> None:
    lines = _make("images", "IMAGE_REGISTRY=reg.local:5000")
    tag = shlex.split(lines[0])[shlex.split(lines[0]).index("-t") + 1].rsplit(":", 1)[1]
    assert tag.removesuffix("-dirty") == _git("rev-parse", "--short", "HEAD")


def test_make_push_images_requires_registry() -> None:
    lines = _make("push-images", "IMAGE_REGISTRY=r.example/x", "TAG=t2")
    assert lines[-2:] == ["docker push r.example/x/slicefm:t2", "docker push r.example/x/slicefm-gpu:t2"]
    res = subprocess.run(
        ["make", "-n", "push-images", "IMAGE_REGISTRY="], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode != 0 and "IMAGE_REGISTRY" in res.stderr
    assert "docker build" not in res.stdout, "nothing is built before the missing registry is reported"
