"""Register pretrained encoders in the MLflow model registry (weights + encoder.json as a pyfunc model)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow.pyfunc

from slicefm import __version__
from slicefm.tracking.store import open_store

ENCODER_FILES = ("encoder.safetensors", "encoder.json")


class EncoderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: input a float array [N, C, H, W] of preprocessed slices, output [N, D] embeddings."""

    def load_context(self, context) -> None:  # noqa: ANN001
        from slicefm.train.export import load_encoder

        self.encoder, self.meta = load_encoder(str(Path(context.artifacts["encoder"])))
        self.encoder.eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        import numpy as np
        import torch

        with torch.no_grad():
            return self.encoder(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


def register_encoder(encoder_uri: str, model_name: str) -> str:
    """Log the encoder under the active run as an MLflow model and register a new version; returns it."""
    store = open_store(encoder_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for key in ENCODER_FILES:
            store.download_file(key, Path(tmp) / "encoder" / key)
        info = mlflow.pyfunc.log_model(
            name="encoder",
            python_model=EncoderModel(),
            artifacts={"encoder": str(Path(tmp) / "encoder")},
            pip_requirements=[f"slicefm=={__version__}"],
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)
