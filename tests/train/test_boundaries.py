"""Layering of the training code: the science reports through callbacks and return values, never to MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.train.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]

SCIENCE = (
    "slicefm.train.loop",
    "slicefm.train.methods",
    "slicefm.train.optim",
    "slicefm.train.distributed",
    "slicefm.train.stage",
    "slicefm.train.supervised",
    "slicefm.models.export_format",
)


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _loaded(modules: tuple[str, ...], package: str) -> list[str]:
    """Modules of `package` that a fresh interpreter holds after importing `modules`."""
    return _python(
        "import importlib, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(*sorted(m for m in sys.modules if m == {package!r} or m.startswith({package + '.'!r})))\n"
    ).split()


def test_training_science_does_not_import_mlflow() -> None:
    assert _loaded(SCIENCE, "mlflow") == []


def test_the_registry_does_not_import_the_training_package() -> None:
    assert _loaded(("slicefm.edge.tracking.registry",), "slicefm.train") == []


def test_pretraining_runs_and_exports_with_mlflow_unimportable(preprocessed: str, tmp_path: Path) -> None:
    """Metrics reach the caller's callback only: a run with `import mlflow` failing trains, logs and exports."""
    cfg = tiny_config("moco", steps=2)
    out = _python(
        "import json, sys\n"
        "sys.modules['mlflow'] = None  # any `import mlflow` now raises ImportError\n"
        "from slicefm.train.config import PretrainConfig\n"
        "from slicefm.train.stage import run_pretrain\n"
        "calls = []\n"
        f"cfg = PretrainConfig.model_validate_json({cfg.model_dump_json()!r})\n"
        f"result = run_pretrain({preprocessed!r}, {str(tmp_path / 'out')!r}, cfg, resume=False,\n"
        "                      log_metrics=lambda metrics, step: calls.append((sorted(metrics), step)))\n"
        "print(json.dumps({'calls': calls, 'encoder_uri': result.encoder_uri}))\n"
    )
    got = json.loads(out.splitlines()[-1])
    # Step 2 ends the run: one step-metrics window and one collapse check, both reported at step 2.
    (steps, step_at), (collapse, check_at) = got["calls"]
    assert step_at == check_at == 2
    assert {"loss", "lr", "slices_per_s", "memory_mb"} <= set(steps) and "eff_rank" in collapse
    assert got["encoder_uri"].endswith("encoder.safetensors") and (tmp_path / "out" / "encoder.json").exists()
