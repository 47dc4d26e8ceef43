"""A fresh virtualenv holding exactly a set of distributions of this environment, without installing them.

`python -m venv` (no system site-packages), then a `.pth` file in its site-packages adds one directory of
symlinks to the requested installed distributions and their dependencies (resolved through
`importlib.metadata` requirements, markers and extras included). Only files a selected distribution's
RECORD lists are reachable: a directory shared with an unselected distribution (a namespace such as
`nvidia/`) becomes a real directory of links to its selected entries. Nothing is downloaded or copied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

Parts = tuple[str, ...]


def requirement_names(lines: Iterable[str]) -> list[str]:
    """Distribution names of requirements.txt lines (comments, blanks and pip options skipped)."""
    out = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text and not text.startswith("-"):
            out.append(Requirement(text).name)
    return out


def distribution_closure(names: Iterable[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions `names` need, transitively: {canonical name: distribution}.

    Raises PackageNotFoundError for a requested name that is not installed; a dependency that is not
    installed (an unused optional one, or one for another platform) is skipped.
    """
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra) pairs already expanded
    todo: list[tuple[str, str, bool]] = [(name, "", True) for name in names]
    while todo:
        name, extra, required = todo.pop()
        key = canonicalize_name(name)
        if (key, extra) in done:
            continue
        try:
            dist = found.get(key) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if required:
                raise
            continue
        found[key] = dist
        done.add((key, extra))
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            todo.append((req.name, "", False))
            todo.extend((req.name, canonicalize_name(x), False) for x in req.extras)
    return found


def _site_files(dist: metadata.Distribution) -> Iterable[Parts]:
    """A distribution's files below its site-packages directory, as path parts (scripts in bin/ skipped)."""
    for path in dist.files or ():
        parts = Path(path).parts
        if parts and ".." not in parts:
            yield parts


def link_tree(selected: dict[str, metadata.Distribution], dest: Path) -> int:
    """Symlink the selected distributions' files into `dest` (one link per wholly selected directory);
    returns the number of links."""
    (site,) = {Path(d.locate_file("")).resolve() for d in selected.values()}
    owners: dict[Parts, set[str]] = defaultdict(set)
    children: dict[Parts, set[Parts]] = defaultdict(set)
    for dist in metadata.distributions(path=[str(site)]):
        key = canonicalize_name(dist.metadata["Name"])
        for parts in _site_files(dist):
            for depth in range(1, len(parts) + 1):
                owners[parts[:depth]].add(key)
                children[parts[: depth - 1]].add(parts[:depth])
    wanted = set(selected)
    links = 0

    def place(prefix: Parts) -> None:
        nonlocal links
        target = dest.joinpath(*prefix)
        if owners[prefix] <= wanted or not children[prefix]:
            target.symlink_to(site.joinpath(*prefix), target_is_directory=site.joinpath(*prefix).is_dir())
            links += 1
            return
        target.mkdir()
        for child in sorted(children[prefix]):
            if owners[child] & wanted:
                place(child)

    dest.mkdir(parents=True)
    for top in sorted(children[()]):
        if owners[top] & wanted and site.joinpath(*top).exists():
            place(top)
    return links


def make_venv(root: Path, distributions: Iterable[str]) -> Path:
    """A venv at `root` (this interpreter's base, no pip, no system site-packages) that sees exactly
    `distributions` and their dependencies; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = root / "deps"
    link_tree(distribution_closure(distributions), deps)
    (Path(site) / "fresh_env_deps.pth").write_text(f"{deps}\n", encoding="utf-8")
    return python


def run_probe(python: Path, *args: Path | str, cwd: Path) -> dict[str, Any]:
    """Run pyfunc_probe.py in the fresh venv: isolated mode (-I: no PYTHONPATH, no script directory on
    sys.path), a minimal environment, outside the checkout; returns its report (args end with OUT_DIR)."""
    out = Path(args[-1])
    out.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    probe = Path(__file__).with_name("pyfunc_probe.py")
    cmd = [str(python), "-I", str(probe), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "report.json").read_text())
