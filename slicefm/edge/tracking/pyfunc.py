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


class HeadFilesModel(mlflow.pyfunc.PythonModel):
    """pyfunc carrier for an evaluation head's files: heads differ in kind (ABMIL, probes) and are rebuilt
    by slicefm's evaluation code from the pulled files, so pyfunc predict is deliberately unsupported.
    Loading needs only MLflow; `files` is the payload directory."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.files = Path(context.artifacts["head"])

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        raise NotImplementedError(
            "slicefm head models carry files only and do not predict through pyfunc: `slicefm models pull` "
            f"the files (here: {self.files}) and load them with slicefm's evaluation code, together with "
            "the encoder its version's tags name (`slicefm.encoder_model`, `slicefm.encoder_version`)"
        )
