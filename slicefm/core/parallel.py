"""Process pools for per-scan work that are safe after torch has started threads.

Forking a process whose OpenMP/torch thread pools are live can deadlock the child, so when torch is loaded
workers come from a forkserver (a clean process started once, which imports the pool's modules: ~1 s, more
than a small cohort's decode). Without torch the workers are forked from the caller, which has those modules
already (numpy's BLAS and pyarrow's pools reset themselves in a forked child). Each worker uses one
intra-op thread: the pool already occupies the cores, and oversubscription slows everything down.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor


def _init_worker(preload: Sequence[str] = ()) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when a worker imports it later
    # Already imported (forked from the caller, or a forkserver that preloaded them); a forkserver this process
    # started earlier for another pool keeps that pool's preload list, and then the worker imports them here.
    for name in preload:
        importlib.import_module(name)
    torch = sys.modules.get("torch")  # preloaded by the server: its thread pool already exists
    if torch is not None:
        torch.set_num_threads(1)


def process_pool(workers: int, preload: Sequence[str]) -> ProcessPoolExecutor:
    """A pool whose workers start with the modules `preload` names already imported (each caller names its
    own, with whatever they import), so a worker starts in milliseconds instead of importing them itself:
    forked from this process (after importing them here) unless torch is loaded, else from a forkserver."""
    if "torch" not in sys.modules:
        for name in preload:
            importlib.import_module(name)
    forked = "torch" not in sys.modules  # a preloaded module may bring it
    ctx = multiprocessing.get_context("fork" if forked else "forkserver")
    if not forked:
        ctx.set_forkserver_preload(list(preload))
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(tuple(preload),)
    )
    if not forked:
        # Start the server now: its imports run while the caller still prepares the work (e.g. scans a DICOM
        # tree), instead of after the first submit. A server this process already runs is kept as it is.
        multiprocessing.forkserver.ensure_running()
    return pool
