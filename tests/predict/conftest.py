"""A trained model made the pipeline's way, small: phantom DICOM -> ingest -> preprocess -> an exported
encoder -> extract -> evaluate (ABMIL, 2 folds). The model directory is the evaluate run's heads plus the
encoder, as a pulled registered head holds them."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from slicefm.data.ingest import ingest
from slicefm.embed.config import ExtractConfig
from slicefm.embed.extract import run_extract
from slicefm.embed.sources import resolve_encoder
from slicefm.evaluate.config import EvaluateConfig
from slicefm.evaluate.stage import run_evaluate
from slicefm.models.encoders import create_encoder
from slicefm.models.export_format import ENCODER_FILES, export_encoder
from slicefm.phantom.dataset import generate_dataset
from slicefm.preprocess.config import PreprocessConfig
from slicefm.preprocess.stage import run_preprocess

KEY = b"k" * 32
PREPROCESS = PreprocessConfig(size=32, workers=1, n_shards=2)
EVALUATE = EvaluateConfig.model_validate(
    {
        "tasks": [{"name": "location", "labels": ["location_*"], "protocols": ["abmil"]}],
        "splits": {"n_folds": 2},
        "abmil": {"epochs": 3, "patience": 2, "batch_size": 4, "hidden": 32},
        "attention_plots": 0,
    }
)


@dataclass(frozen=True)
class Trained:
    raw: Path  # the phantom DICOM tree
    ingested: str
    preprocessed: str
    encoder: Path
    evaluate: str  # the evaluate output
    model_dir: Path  # heads + encoder/


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("predict-model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_dataset(root / "raw", 8, "dicom", seed=11, shape_xy=64)
        ingest(root / "raw", str(root / "ingest"), KEY, "dicom", workers=1)
        run_preprocess(str(root / "ingest"), str(root / "pre"), PREPROCESS)
        torch.manual_seed(0)
        export_encoder(
            create_encoder("vit_tiny_test", 32, 1),
            str(root / "encoder"),
            {"method": "moco", "input_channels": "per_window"},
        )
        extract_cfg = ExtractConfig(encoder="pretrained", workers=0, batch_size=32)
        encoder, info = resolve_encoder(extract_cfg, str(root / "encoder"), 2, 32)
        run_extract(str(root / "pre"), str(root / "emb"), encoder, info, extract_cfg)
        run_evaluate([str(root / "emb")], str(root / "eval"), EVALUATE)
    finally:
        torch.set_num_threads(threads)
    model = root / "model"
    shutil.copytree(root / "eval" / "location" / "pretrained" / "abmil" / "heads", model)
    (model / "encoder").mkdir()
    for name in ENCODER_FILES:
        shutil.copyfile(root / "encoder" / name, model / "encoder" / name)
    return Trained(
        root / "raw", str(root / "ingest"), str(root / "pre"), root / "encoder", str(root / "eval"), model
    )
