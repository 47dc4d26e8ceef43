"""`make run-pipeline`'s terminal: one line per task from a real kfp.local run, every task's log in a file."""
# No `from __future__ import annotations`: KFP reads the components' annotations as types.



import io
from pathlib import Path

import pytest
from kfp import dsl, local

from slicefm.edge.kfp_local_log import routed_stdout


@dsl.component(base_image="python:3.11")
def add(a: float, b: float) -> float:
    print("adding", a, b)
    return a + b


@dsl.component(base_image="python:3.11")
def shout(word: str):
    for _ in range(50):
        print(word.upper())


@dsl.component(base_image="python:3.11")
def boom(x: float):
    print("about to fail with", x)
    raise ValueError("boom in the step")


@dsl.pipeline
def fine():
    total = add(a=1.0, b=2.0)
    shout(word="quiet").after(total)


@dsl.pipeline
def failing():
    total = add(a=1.0, b=2.0)
    boom(x=total.output)


def _run(pipeline, tmp_path: Path, terminal: io.StringIO) -> Path:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    logs = tmp_path / "logs"
    with routed_stdout(logs, terminal):
        pipeline()
    return logs


def test_each_task_is_one_line_with_its_duration_and_value_and_its_log_a_file(tmp_path):
    terminal = io.StringIO()
    logs = _run(fine, tmp_path, terminal)
    printed = terminal.getvalue()
    lines = printed.splitlines()
    assert len(lines) == 2, printed  # nothing else reaches the terminal
    assert lines[0].startswith("  + add ") and lines[0].endswith(" -> 3.0")
    assert lines[1].startswith("  + shout ") and " s" in lines[1]
    add_log, shout_log = sorted(logs.glob("0*.log"))
    assert add_log.name == "01-add.log" and "adding 1.0 2.0" in add_log.read_text()
    assert shout_log.read_text().count("QUIET") == 50 and "QUIET" not in add_log.read_text()
    assert "\x1b[" not in (logs / "pipeline.log").read_text()  # colours stripped from the files
    assert (logs / "pipeline.log").read_text().count("QUIET") == 50


def test_a_failed_task_prints_its_log_tail_and_where_the_log_is(tmp_path):
    terminal = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"):
        _run(failing, tmp_path, terminal)
    boom_log = tmp_path / "logs" / "02-boom.log"
    lines = terminal.getvalue().splitlines()
    assert lines[0].startswith("  + add ") and lines[1].startswith("  x boom FAILURE after ")
    assert lines[1].endswith(f"log: {boom_log}")
    assert any("ValueError: boom in the step" in line for line in lines[2:])  # the log's tail
    assert "about to fail with 3.0" in boom_log.read_text()
