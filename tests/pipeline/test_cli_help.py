"""`slicefm pipeline run|compile|submit --help` document every option and every environment variable the verb
reads: the variables are found in the code (os.environ.get("X"), os.environ["X"], os.getenv("X")), so the help
cannot fall behind it."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from pipelines.runner import DOCKER_STEP_ENV
from slicefm.data.pseudonym import KEY_ENV, KEY_FILE_ENV
from slicefm.edge.cli import build_parser
from slicefm.edge.state import STATE_ENV

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "pipelines/runner.py"
KFP_SUBMIT = ROOT / "pipelines/kfp_submit.py"
SETTINGS = ROOT / "components/settings.py"
CLI = ROOT / "slicefm/edge/cli_pipeline.py"
# The functions each verb runs that read the environment, by file.
VERB_CODE = {
    "run": {RUNNER: {"run_local", "_container_runner"}, CLI: {"add_run_parser", "cmd_pipeline_run"}},
    "compile": {RUNNER: {"compile_pipeline"}, CLI: {"add_compile_parser", "cmd_pipeline_compile"}},
    "submit": {RUNNER: {"submit", "_cluster_arguments"}, CLI: {"add_submit_parser", "cmd_pipeline_submit"}},
}
# Read through helpers under a constant's name: state_dir, resolve_tracking_uri, load_key, the DockerRunner's env.
THROUGH_HELPERS = {
    "run": {STATE_ENV, "MLFLOW_TRACKING_URI", KEY_ENV, KEY_FILE_ENV, *DOCKER_STEP_ENV},
    "compile": set(),
    "submit": set(),
}


def _is_environ(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", "") == "os"
    )


def _read_name(node: ast.AST) -> str | None:
    """The variable a node reads when it is os.environ.get("X", ...), os.getenv("X", ...) or os.environ["X"]."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
        func = node.func
        reads = (func.attr == "get" and _is_environ(func.value)) or (
            func.attr == "getenv" and getattr(func.value, "id", "") == "os"
        )
        key = node.args[0]
    elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
        reads, key = _is_environ(node.value), node.slice
    else:
        return None
    return key.value if reads and isinstance(key, ast.Constant) and isinstance(key.value, str) else None


def env_reads(path: Path) -> dict[str, set[str]]:
    """The environment variables read in a module, by top-level function ("" for module-level code)."""
    found: dict[str, set[str]] = {}
    for top in ast.parse(path.read_text()).body:
        owner = top.name if isinstance(top, ast.FunctionDef) else ""
        names = {n for node in ast.walk(top) if (n := _read_name(node))}
        if names:
            found.setdefault(owner, set()).update(names)
    return found


def verb_parser(verb: str) -> argparse.ArgumentParser:
    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices

    return subparsers(subparsers(build_parser())["pipeline"])[verb]


def test_every_function_reading_the_environment_belongs_to_a_verb():
    """A new function reading a variable must be added to VERB_CODE, so that its variable is checked below."""
    for path in (RUNNER, CLI, KFP_SUBMIT):
        readers = set(env_reads(path))
        covered = set().union(*(code.get(path, set()) for code in VERB_CODE.values()))
        assert readers <= covered, f"{path.name}: {sorted(readers - covered)} read the environment"
    assert env_reads(KFP_SUBMIT) == {}, "kfp_submit takes its settings as arguments"
    # The search finds what the code reads (else the checks below would pass on nothing).
    assert {"KFP_HOST", "KFP_SERVICE_ACCOUNT", "KFP_PIPELINE_VERSION"} <= env_reads(CLI)["add_submit_parser"]
    assert {"MLFLOW_TRACKING_URI", "SLICEFM_DATA_SOURCE"} <= env_reads(RUNNER)["submit"] | env_reads(RUNNER)[
        "_cluster_arguments"
    ]
    assert env_reads(SETTINGS)[""] >= {"SLICEFM_IMAGE", "SLICEFM_EXTRACT_PARALLELISM"}


@pytest.mark.parametrize("verb", sorted(VERB_CODE))
def test_help_lists_every_environment_variable_the_verb_reads(verb):
    needed = set(env_reads(SETTINGS)[""]) | THROUGH_HELPERS[verb]
    for path, functions in VERB_CODE[verb].items():
        reads = env_reads(path)
        needed |= set().union(*(reads.get(f, set()) for f in functions))
    text = verb_parser(verb).format_help()
    section = text[text.index("environment variables:") :]
    missing = sorted(name for name in needed if not re.search(rf"^  {name}\s", section, re.MULTILINE))
    assert missing == [], f"`slicefm pipeline {verb} --help` does not document {missing}"


@pytest.mark.parametrize("verb", sorted(VERB_CODE))
def test_every_option_has_a_help_text(verb):
    undocumented = [a.option_strings for a in verb_parser(verb)._actions if not a.help]
    assert undocumented == []


def test_the_help_names_the_submit_settings():
    text = verb_parser("submit").format_help()
    for option in ("--host", "--namespace", "--experiment", "--token", "--service-account", "--version-name"):
        assert option in text
    assert "named by the git commit" in text and "service account" in text
