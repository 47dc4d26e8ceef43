"""The one rule for where a run's local state lives: the KFP pipeline root, the MLflow database and its
artifacts, local runs' outputs. `$SLICEFM_HOME` when set (the Makefile sets it to the checkout's
`.slicefm/`), else `.slicefm/` under the working directory."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

STATE_ENV = "SLICEFM_HOME"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The absolute state directory (not created here). An empty `$SLICEFM_HOME` counts as unset."""
    env = os.environ if environ is None else environ
    return Path(env.get(STATE_ENV) or Path.cwd() / ".slicefm").expanduser().resolve()
