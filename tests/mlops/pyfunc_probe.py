"""Run by a fresh venv's python (`-I`, see fresh_env.py): load a registered slicefm pyfunc model as a consumer
would, with slicefm not installed, and write what happened to OUT_DIR (report.json, outputs.npz).

Usage: python -I pyfunc_probe.py encoder MODEL_DIR INPUT.npy OUT_DIR
       python -I pyfunc_probe.py head MODEL_DIR NO_CODE_MODEL_DIR OUT_DIR
       python -I pyfunc_probe.py stack MODEL_DIR STACK.npy OUT_DIR
(`head` also tries NO_CODE_MODEL_DIR first, an encoder model stripped of its code: it must not load;
`stack`: a predicting head model applied to one scan's stack, its output row in report.json.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any


def _encoder(model_dir: str, batch_npy: str, out: Path) -> dict[str, Any]:
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import Model

    model = mlflow.pyfunc.load_model(model_dir)
    example = Model.load(model_dir).load_input_example(model_dir)
    np.savez(
        out / "outputs.npz",
        example=example,
        example_out=model.predict(example),
        batch_out=model.predict(np.load(batch_npy)),
    )
    return {}


def _head(model_dir: str, no_code_dir: str, out: Path) -> dict[str, Any]:
    import mlflow.pyfunc
    import numpy as np

    report: dict[str, Any] = {"no_code_error": None, "head_predict_error": None}
    try:
        mlflow.pyfunc.load_model(no_code_dir)
    except Exception as exc:  # reported; the test asserts what it was
        report["no_code_error"] = f"{type(exc).__name__}: {exc}"
    model = mlflow.pyfunc.load_model(model_dir)
    report["torch_imported"] = "torch" in sys.modules
    try:
        model.predict(np.zeros((1, 1), dtype=np.float32))
    except NotImplementedError as exc:
        report["head_predict_error"] = str(exc)
    return report


def _stack(model_dir: str, stack_npy: str, out: Path) -> dict[str, Any]:
    import mlflow.pyfunc
    import numpy as np

    model = mlflow.pyfunc.load_model(model_dir)
    return {"row": model.predict(np.load(stack_npy)).iloc[0].to_dict()}


def main(mode: str, model_dir: str, extra: str, out_dir: str) -> None:
    report: dict[str, Any] = {"slicefm_importable": importlib.util.find_spec("slicefm") is not None}
    out = Path(out_dir)
    probes = {"encoder": _encoder, "head": _head, "stack": _stack}
    report.update(probes[mode](model_dir, extra, out))
    report["slicefm_file"] = getattr(sys.modules.get("slicefm"), "__file__", None)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:5])
