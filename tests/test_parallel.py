"""Process pools: forked from the caller when torch is not loaded (no start-up cost), from a forkserver when it
is (forking live OpenMP pools can deadlock); either way the workers have the preloaded modules and one thread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch  # noqa: F401  (loaded here, as in a process that trains or embeds)

from slicefm.core.parallel import process_pool

ROOT = Path(__file__).resolve().parent.parent


def _worker_state(_: int) -> tuple[int, bool, bool, str]:
    return os.getpid(), "slicefm.preprocess.fused" in sys.modules, "torch" in sys.modules, os.environ["OMP_NUM_THREADS"]


def test_pool_with_torch_loaded_uses_a_forkserver():
    # Another test may have started this process's forkserver with another preload list: the workers still
    # have the modules this pool names.
    with process_pool(2, preload=("tests.parallel_probe",)) as pool:
        list(pool.map(_worker_state, range(2)))
    with process_pool(2, preload=("slicefm.preprocess.fused",)) as pool:
        assert pool._mp_context.get_start_method() == "forkserver"
        states = list(pool.map(_worker_state, range(4)))
    assert all(pid != os.getpid() and preloaded and threads == "1" for pid, preloaded, _, threads in states)


def test_pool_without_torch_forks_the_caller():
    code = """
import sys
from slicefm.core.parallel import process_pool

def state(_):
    return ("preloaded" if "slicefm.preprocess.fused" in sys.modules else "missing") + (
        "-torch" if "torch" in sys.modules else "-no-torch"
    )

pool = process_pool(2, preload=("slicefm.preprocess.fused",))
print(pool._mp_context.get_start_method(), *pool.map(state, range(2)))
pool.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["fork", "preloaded-no-torch", "preloaded-no-torch"]

