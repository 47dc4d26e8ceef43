"""One progress line per task for a kfp.local run; each task's full log in a file of its own.

kfp.local writes its own messages and every step's streamed output to `sys.stdout` (about 2,700 lines for
the demo). `TaskLogRouter` stands in for stdout while the pipeline runs: it follows kfp.local's
"Executing task 'x'" / "Task 'x' finished with status ..." messages, writes every line to
`<log_dir>/<nn>-<task>.log` (and all of them to `<log_dir>/pipeline.log`), and prints to the real terminal
one line per task: state, duration and the task's returned value when it is short (a loss, a summary line).
A failed task also gets the tail of its log and the log's path.
"""

from __future__ import annotations

import io
import re
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = r"^\d\d:\d\d:\d\d\.\d+ - \w+ - "
_START = re.compile(_PREFIX + r"Executing task '([^']+)'")
_END = re.compile(_PREFIX + r"Task '([^']+)' finished with status (\w+)")
_CACHED = re.compile(_PREFIX + r"Task (\S+) cache hit")
_OUTPUT = re.compile(r"^\s*Output: (.+)$")
_TAIL_LINES = 25
_MAX_VALUE = 60


@dataclass
class _Task:
    name: str
    log: Path
    started: float = field(default_factory=time.monotonic)
    output: str = ""
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=_TAIL_LINES))
    file: TextIO | None = None  # the task's log, open while it runs


class TaskLogRouter(io.TextIOBase):
    """A write-only text stream: kfp.local's output in, per-task log files and progress lines out."""

    def __init__(self, log_dir: Path, terminal: TextIO) -> None:
        self.log_dir = log_dir
        self.terminal = terminal
        log_dir.mkdir(parents=True, exist_ok=True)
        self._all = (log_dir / "pipeline.log").open("a", encoding="utf-8")
        self._buffer = ""
        self._task: _Task | None = None
        self._done: tuple[_Task, float] | None = None  # succeeded, its line waits for the returned value
        self._count = 0
        self.failed: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        if not self._all.closed:
            self._all.flush()
        self.terminal.flush()

    def close(self) -> None:
        if self.closed:
            return
        if self._buffer:
            self._line(self._buffer)
            self._buffer = ""
        self._report_done()
        if self._task is not None:  # interrupted mid-task: say where its log is
            self._close_task_log()
            self._print(f"  ? {self._task.name} did not finish; log: {self._task.log}")
            self._task = None
        self._all.close()
        super().close()

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        self._all.write(line + "\n")
        if m := _START.match(line):
            self._report_done()
            self._count += 1
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", m.group(1))
            self._close_task_log()
            log = self.log_dir / f"{self._count:02d}-{safe}.log"
            self._task = _Task(m.group(1), log, file=log.open("a", encoding="utf-8"))
        if self._task is not None:
            self._task.tail.append(line)
            self._task.file.write(line + "\n")
        if m := _END.match(line):
            self._finish(m.group(1), m.group(2))
        elif m := _CACHED.match(line):
            self._report_done()
            self._print(f"  = {m.group(1).strip(chr(39))} (cached)")
        elif self._done is not None and (m := _OUTPUT.match(line)):
            self._done[0].output = m.group(1).strip()
            self._report_done()
        elif self._done is not None and line.endswith("has no outputs"):
            self._report_done()

    def _finish(self, name: str, state: str) -> None:
        self._report_done()
        task = self._task if self._task is not None and self._task.name == name else _Task(name, Path("-"))
        self._close_task_log()
        self._task = None
        elapsed = time.monotonic() - task.started
        if state == "SUCCESS":
            self._done = (task, elapsed)
            return
        self.failed.append(name)
        self._print(f"  x {name} {state} after {_duration(elapsed)}; log: {task.log}")
        for tail in task.tail:
            self._print(f"      {tail}")

    def _close_task_log(self) -> None:
        if self._task is not None and self._task.file is not None:
            self._task.file.close()
            self._task.file = None

    def _report_done(self) -> None:
        if self._done is None:
            return
        task, elapsed = self._done
        self._done = None
        value = f"  -> {task.output}" if task.output and len(task.output) <= _MAX_VALUE else ""
        self._print(f"  + {task.name} {_duration(elapsed)}{value}")

    def _print(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@contextmanager
def routed_stdout(log_dir: Path, terminal: TextIO) -> Iterator[TaskLogRouter]:
    """Route `sys.stdout` through a TaskLogRouter for the block (kfp.local resolves sys.stdout per task)."""
    import sys

    router = TaskLogRouter(log_dir, terminal)
    previous = sys.stdout
    sys.stdout = router
    try:
        yield router
    finally:
        sys.stdout = previous
        router.close()
