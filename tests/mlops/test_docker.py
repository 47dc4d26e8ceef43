"""The build context (.dockerignore), the lock the images install and `make push-images`, checked without
building (see test_images.py)."""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"project": ROOT / "docker" / "Dockerfile"}  # Dockerfile.deps builds from a temp context
LOCK = ROOT / "requirements.lock"


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


def _tracked(folder: str) -> list[str]:
    """The files git tracks under `folder`: what a clean clone's build context must carry from it."""
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_dockerignore_keeps_what_the_dockerfiles_copy() -> None:
    patterns = _dockerignore()
    for path in DOCKERFILES.values():
        _, stages = parse_dockerfile(path)
        for arg in (a for s in stages for a in s.args("COPY") if not a.startswith("--from")):
            for src in arg.split()[:-1]:
                assert (ROOT / src).exists(), f"{path.name}: COPY source {src} missing"
                files = [src] if (ROOT / src).is_file() else _tracked(src)
                assert files and not [f for f in files if _ignored(f, patterns)], (
                    f"{src} excluded from context"
                )


def test_make_push_images_requires_registry() -> None:
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "push-images", "IMAGE_REGISTRY=r.example/x", "TAG=t2"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert "docker push r.example/x/slicefm:0.1.0-t2" in out and "docker push r.example/x/slicefm:0.1.0" in out
    res = subprocess.run(
        ["make", "-n", "push-images", "IMAGE_REGISTRY="], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode != 0 and "IMAGE_REGISTRY" in res.stderr
    assert "docker build" not in res.stdout, "nothing is built before the missing registry is reported"


# --- requirements.lock: what the dependency image installs ----------------------------------------


def _lock() -> dict[NormalizedName, Version]:
    pins: dict[NormalizedName, Version] = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier  # one exact pin per line
            assert spec.operator == "==" and not req.marker, line
            name = canonicalize_name(req.name)
            assert name not in pins, f"{req.name} pinned twice"
            pins[name] = Version(spec.version)
    return pins


def test_deps_image_installs_exactly_the_lock() -> None:
    """Dockerfile.deps copies requirements.lock in and pip-installs that file with --no-deps, so nothing
    outside the lock (and no other version) reaches the image: the checks below are about the image."""
    _, (stage,) = parse_dockerfile(ROOT / "docker" / "Dockerfile.deps")
    (copied,) = [a.split()[-1] for a in stage.args("COPY") if a.split()[0] == "requirements.lock"]
    installs = [
        shlex.split(cmd)
        for run in stage.args("RUN")
        for cmd in run.split("&&")
        if re.search(r"\bpip install\b", cmd)
    ]
    assert len(installs) == 1, installs
    argv = installs[0]
    assert argv[argv.index("-r") + 1] == copied and "--no-deps" in argv


def test_lock_satisfies_pyproject() -> None:
    """Every dependency pyproject declares (the test extra too) is pinned in the lock at a version its
    specifier accepts: torch==2.14.1 and kfp==2.17.0 are what the images run."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for line in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{line} is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{line} vs lock {pins[name]}"


def test_lock_is_closed_under_the_dependencies_it_installs() -> None:
    """The image installs the lock with --no-deps, so the lock must hold the whole dependency closure of
    pyproject's requirements (extras followed) at versions every requirer accepts: what `pip check` proves
    in the image build, checked here from the metadata of this environment, which `make setup` installs
    from the same lock (same Python and platform as the image, so the markers evaluate alike)."""
    pins = _lock()
    stale = {n: md.version(n) for n in pins if Version(md.version(n)) != pins[n]}
    assert not stale, f"environment differs from requirements.lock (run make setup): {stale}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]
    seen: set[tuple[str, frozenset[str]]] = set()
    problems = []
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for dep in map(Requirement, md.distribution(name).requires or []):
            if dep.marker and not any(dep.marker.evaluate({"extra": e}) for e in ["", *extras]):
                continue
            dep_name = canonicalize_name(dep.name)
            if dep_name not in pins:
                problems.append(f"{name} needs {dep}, not in the lock")
            elif not dep.specifier.contains(pins[dep_name], prereleases=True):
                problems.append(f"{name} needs {dep}, lock has {pins[dep_name]}")
            else:
                todo.append(dep)
    assert not problems, problems
    # The walk did follow extras (dvc[s3]) and platform markers (torch's CUDA wheels on Linux).
    assert {"torch", "kfp", "mlflow", "dvc-s3", "nvidia-cudnn-cu13"} <= {n for n, _ in seen}
