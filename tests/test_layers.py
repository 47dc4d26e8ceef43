"""The library's layers (README, "Architecture"): no module imports a package above its own (issue 16.1).

Every import of every module under slicefm/ counts, including those inside functions and under
TYPE_CHECKING. Packages on one level are independent of each other, so the graph is acyclic by construction.
`python -m tests.test_layers` prints the measured graph (package -> the slicefm packages it imports), the one
README.md shows.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "slicefm"

# Bottom to top; a package may import the packages of the levels below its own, never its own level's others.
# `config` is the top-level slicefm/config.py, which gathers every package's config section.
LEVELS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("io",),
    ("data", "phantom"),
    ("preprocess", "models"),
    ("ssl", "mil"),
    ("train", "embed"),
    ("evaluate",),
    ("predict",),
    ("config",),
    ("edge",),
)
RANK = {package: level for level, packages in enumerate(LEVELS) for package in packages}
# The package root (slicefm.__version__) and the `python -m slicefm` entry point are not layers.
EXEMPT = {"__init__", "__main__"}
# The library below the config and the edge: core, io, data, ... evaluate.
SCIENCE = tuple(package for package, level in RANK.items() if level < RANK["config"])
# Tracking, orchestration and the object store's client are the edge's business...
EDGE_ONLY = ("mlflow", "kfp", "boto3", "botocore")
# ...except that the artifact store (the bottom layer, not science) is the one S3 client: it reads and writes
# s3:// URIs for every package, through boto3 (its client plumbing and ranged-read fast path in s3_client).
EDGE_ONLY_ALLOWED = {"slicefm.core.store": ("boto3", "botocore"), "slicefm.core.s3_client": ("boto3", "botocore")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; `from a import b` yields `a.b` (b may be a
    submodule) and relative imports are resolved against the file's package."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base


def package_of(module: str) -> str | None:
    """The layer a slicefm module belongs to (None outside slicefm and for the package root and its names,
    e.g. `from slicefm import __version__`)."""
    parts = module.split(".")
    if parts[0] != "slicefm" or len(parts) == 1:
        return None
    is_module = (LIBRARY / parts[1]).is_dir() or (LIBRARY / f"{parts[1]}.py").is_file()
    return parts[1] if is_module else None


def library_modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(LIBRARY.rglob("*.py")):
        yield module_name(path), path


def import_graph() -> dict[str, set[str]]:
    """package -> the other slicefm packages its modules import."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in library_modules():
        source = package_of(module)
        if source is None or source in EXEMPT:
            continue
        graph[source]
        for _, name in imports(path):
            target = package_of(name)
            if target is not None and target != source and target not in EXEMPT:
                graph[source].add(target)
    return dict(graph)


def format_graph(graph: dict[str, set[str]]) -> str:
    """One line per package, bottom to top: `package -> a, b` (`-` for none)."""
    order = sorted(graph, key=lambda p: (RANK.get(p, len(LEVELS)), p))
    return "\n".join(
        f"{p} -> {', '.join(sorted(graph[p], key=lambda q: (RANK.get(q, 0), q))) or '-'}" for p in order
    )


def test_every_package_has_a_level() -> None:
    found = {package_of(m) for m, _ in library_modules()} - {None} - EXEMPT
    assert found == set(RANK), f"unranked: {sorted(found - set(RANK))}; gone: {sorted(set(RANK) - found)}"


def test_no_module_imports_a_package_above_or_beside_its_own() -> None:
    violations = []
    for module, path in library_modules():
        source = package_of(module)
        if source is None or source in EXEMPT:
            continue
        for line, name in imports(path):
            target = package_of(name)
            if target is None or target == source or target in EXEMPT:
                continue
            if target not in RANK or RANK[target] >= RANK[source]:
                violations.append(f"{module}:{line} imports {name} ({source} -> {target})")
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_science_packages_import_neither_mlflow_nor_kfp_nor_boto3() -> None:
    violations = []
    for module, path in library_modules():
        if package_of(module) not in SCIENCE:
            continue
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in EDGE_ONLY and top not in EDGE_ONLY_ALLOWED.get(module, ()):
                violations.append(f"{module}:{line} imports {name}")
    assert not violations, "the edge's dependencies in the science:\n" + "\n".join(violations)


def test_readme_shows_the_measured_graph() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"<!-- import-graph -->\n```text\n(.*?)```\n<!-- /import-graph -->", readme, re.DOTALL)
    assert shown, "README.md has no import-graph block"
    assert shown.group(1).strip() == format_graph(import_graph()), "run `python -m tests.test_layers`"


if __name__ == "__main__":
    print(format_graph(import_graph()))
