"""The build context (.dockerignore) and `make push-images`, checked without building (see test_images.py)."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"project": ROOT / "docker" / "Dockerfile"}  # Dockerfile.deps builds from a temp context


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
