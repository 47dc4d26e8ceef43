"""Each verb imports only what its stage needs (issue 16.8): `slicefm ingest` used to spend 6 s of its 8 s
importing torch, timm and the evaluation through slicefm.edge.stages before reading a file.

The verbs run for real, as `python -m slicefm ...` in a fresh interpreter with PYTHONPROFILEIMPORTTIME=1:
the variable is inherited by the forkserver and every pool worker, so their imports are listed too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# `import time: <self us> | <cumulative us> | <indented module>`; a worker's line may follow a tqdm `\r`.
_IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)")
# What the pipeline's training, embedding, tracking, orchestration and evaluation bring in.
HEAVY = ("torch", "timm", "mlflow", "kfp", "sklearn", "matplotlib")


def run_verb(*argv: str) -> tuple[str, set[str]]:
    """Run `slicefm <argv>` in a fresh interpreter; its stdout and the top-level packages any of its processes
    imported."""
    env = {
        **os.environ,
        "PYTHONPROFILEIMPORTTIME": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "slicefm", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    log = "\n".join(line for line in proc.stderr.splitlines() if not _IMPORT_LINE.search(line))
    assert proc.returncode == 0, f"slicefm {' '.join(argv)} exited {proc.returncode}:\n{log[-3000:]}"
    return proc.stdout, {m.group(1).split(".")[0] for m in _IMPORT_LINE.finditer(proc.stderr)}


def heavy(imported: set[str]) -> list[str]:
    return sorted(set(HEAVY) & imported)


def test_data_ingest_preprocess_import_only_their_stage(tmp_path: Path) -> None:
    """Phantom data -> ingest (two workers: the pool's processes count) -> preprocess, and both in one pass,
    on real files (with the phantom's masks). None imports torch: its import (3-4 s per pool) would be most of
    a small cohort's preprocessing time (benchmarks/preprocess.py)."""
    out, imported = run_verb(
        "data", "phantom", "--n-scans", "2", "--size", "64", "--out", str(tmp_path / "raw")
    )
    assert "wrote 2 phantom scans" in out
    assert heavy(imported) == []

    out, imported = run_verb(
        "ingest", "--source", str(tmp_path / "raw"), "--out", str(tmp_path / "scans"), "--workers", "2"
    )
    assert "ingested 2 scans" in out
    assert "pydicom" in imported  # the verb really read the files
    assert heavy(imported) == []

    out, imported = run_verb("preprocess", "--scans", str(tmp_path / "scans"), "--out", str(tmp_path / "pre"))
    assert "preprocessed 2 scans" in out
    assert heavy(imported) == []

    out, imported = run_verb(
        "ingest", "--source", str(tmp_path / "raw"), "--out", str(tmp_path / "scans2"), "--workers", "2",
        "--preprocess-out", str(tmp_path / "pre2"),
    )  # fmt: skip
    assert "ingested 2 scans" in out and "preprocessed in the same pass" in out
    assert "pydicom" in imported and "PIL" in imported  # it read and resized
    assert heavy(imported) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["ingest", "--help"],
        ["pipeline", "run", "--help"],
        ["pipeline", "submit", "--help"],
        ["key", "show"],
        ["key", "init", "--if-missing"],
        ["config", "default"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_light_verbs_import_nothing_heavy(argv: list[str]) -> None:
    """Building the parser (every verb's --help) and the key and config verbs."""
    _, imported = run_verb(*argv)
    assert "slicefm" in imported
    assert heavy(imported) == []


def test_untracked_stages_do_not_import_mlflow_or_kfp() -> None:
    """The training, embedding and evaluation verbs import torch and their science, but MLflow only for a
    tracked run (a tracking URI) and kfp only in the pipeline verbs."""
    code = (
        "import sys\n"
        "import slicefm.edge.cli, slicefm.edge.stages\n"
        "import slicefm.train.stage, slicefm.train.supervised, slicefm.embed.extract, slicefm.embed.sources\n"
        "import slicefm.evaluate.stage, slicefm.evaluate.external_stage, slicefm.edge.kfp_reports\n"
        "from slicefm.edge.tracking.mlflow_runs import active_mlflow\n"
        "assert active_mlflow() is None\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    imported = set(proc.stdout.split())
    assert {"torch", "timm", "sklearn"} <= imported
    assert "mlflow" not in imported
    assert "kfp" not in imported
