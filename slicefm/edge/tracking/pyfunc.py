"""The pyfunc classes of slicefm's registered models, as MLflow loads them in a consumer's environment.

A registered model carries slicefm's code (MLflow `code_paths`, put on `sys.path` at load time) and an
entry script that instantiates one of these classes (MLflow "models from code": no pickle). This module
therefore imports nothing but MLflow (and numpy, an MLflow dependency) at module level; torch and the
encoder code load in `load_context`. `predict`'s `np.ndarray` hint is one MLflow accepts without inferring
a schema from it: the encoder's schema is the tensor signature it is logged with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np


class EncoderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: input a float32 array [N, C, H, W] of preprocessed slices, output [N, D] embeddings."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from slicefm.models.export_format import load_encoder

        self.encoder, self.meta = load_encoder(str(Path(context.artifacts["encoder"])))
        self.encoder.eval()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.encoder(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


class HeadModel(mlflow.pyfunc.PythonModel):
    """pyfunc of a head bundled with its encoder: input one scan's preprocessed slice stack, as `slicefm
    preprocess` stores it ([slices, channels, H, W]: uint8 window values, or z-scores); output one row of
    per-class probabilities (`p_<class>`, mean of the fold heads) and thresholded labels (`label_<class>`).
    The same computation as `slicefm predict` (slicefm.predict.scoring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from slicefm.predict.bundle import load_bundle
        from slicefm.predict.scoring import inference_device

        self.bundle = load_bundle(Path(context.artifacts["head"]))
        self.device, self.bf16 = inference_device()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> Any:
        import pandas as pd

        from slicefm.predict.scoring import score_stack

        stack = stack_as_stored(np.asarray(model_input), self.bundle.preprocess.normalisation)
        scores = score_stack(self.bundle, stack, device=self.device, bf16=self.bf16)
        names = self.bundle.class_names
        row = {f"p_{c}": float(p) for c, p in zip(names, scores.probabilities, strict=True)}
        row |= {f"label_{c}": int(v) for c, v in zip(names, scores.labels, strict=True)}
        return pd.DataFrame([row])


def stack_as_stored(x: np.ndarray, normalisation: str) -> np.ndarray:
    """A request's stack in the dtype preprocess stores (uint8 windows, float16 z-scores); ValueError when
    window values are not whole numbers in 0..255 (a float image scaled to [0, 1] is the usual mistake)."""
    if normalisation == "zscore":
        return x.astype(np.float16)
    if x.dtype == np.uint8:
        return x
    as_uint8 = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if not np.array_equal(as_uint8, x):
        raise ValueError(
            "window stacks hold whole numbers 0..255 (uint8, as `slicefm preprocess` stores them); got other values"
        )
    return as_uint8


class HeadFilesModel(mlflow.pyfunc.PythonModel):
    """pyfunc carrier for the files of a head registered without its encoder: it cannot go from a scan to
    probabilities, so pyfunc predict refuses and says why (HeadModel is the head that predicts). Loading needs
    only MLflow; `files` is the payload directory."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.files = Path(context.artifacts["head"])

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        raise NotImplementedError(
            "this head model was registered without its encoder (no `slicefm.encoder_version` in its lineage), "
            f"so it carries the head's files only (here: {self.files}) and does not predict: `slicefm models "
            "pull` them for slicefm's evaluation code, or re-run evaluate once its encoder is registered to get "
            "a head that predicts (`slicefm predict`, pyfunc)"
        )
