"""A deployable model: the fold heads of one evaluation run, the encoder their embeddings came from, and the
preprocessing both assume, read from one directory and checked against each other.

Layout (what `slicefm models pull` of a registered head writes, and what the evaluate stage saves under
`<task>/<model>/<protocol>/heads/` plus the encoder):

    fold-<k>.json          spec, class names, thresholds, windows, encoder info, preprocessing
    fold-<k>.safetensors   the head's weights
    encoder/encoder.json, encoder/encoder.safetensors
    lineage.json           (registered models) registry lineage: encoder_model, encoder_version, ...
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from torch import nn

from slicefm.embed.extract import windows_for
from slicefm.evaluate.train_head import HeadSpec, TrainedHead
from slicefm.models.encoders import Encoder
from slicefm.models.export_format import ENCODER_FILES, load_encoder
from slicefm.preprocess.config import PreprocessConfig, channel_names, resolve_windows

ENCODER_DIR = "encoder"
LINEAGE_FILE = "lineage.json"
# Settings that change how work is split, never the values computed.
EXECUTION_ONLY = frozenset({"workers", "n_shards"})


class ModelBundleError(ValueError):
    """A model directory that cannot be applied as it is (missing parts, or parts that disagree)."""


@dataclass
class FoldHead:
    """One cross-validation fold's head and the thresholds fitted on its validation set."""

    fold: int
    head: TrainedHead
    thresholds: np.ndarray
    model: nn.Module  # the head built and loaded (eval mode)


@dataclass
class ModelBundle:
    """Everything `predict` needs, verified consistent: heads, encoder, preprocessing, class names."""

    root: Path
    task: str
    protocol: str  # "abmil" | "probe"
    class_names: list[str]
    loss: str  # "bce" (independent classes) | "ce" (exclusive classes)
    folds: list[FoldHead]
    windows: list[str]  # the head's bag windows, in bag order
    channels: list[str]  # the preprocessed stack's channels, in stack order
    preprocess: PreprocessConfig
    encoder: Encoder
    encoder_meta: dict[str, Any]
    input_channels: str  # "stacked" | "per_window"
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def has_attention(self) -> bool:
        return self.protocol == "abmil"

    @property
    def thresholds(self) -> np.ndarray:
        """The ensemble's thresholds: the mean of the folds' validation-F1 thresholds."""
        return np.mean([f.thresholds for f in self.folds], axis=0)

    def describe(self) -> dict[str, Any]:
        """What the model is, for predict.json and the report (no weights, no paths outside the bundle)."""
        return {
            "task": self.task,
            "protocol": self.protocol,
            "loss": self.loss,
            "class_names": self.class_names,
            "folds": len(self.folds),
            "thresholds": [float(t) for t in self.thresholds],
            "windows": self.windows,
            "encoder": {k: self.encoder_meta.get(k) for k in ("encoder", "method", "img_size", "in_chans",
                                                              "embed_dim", "weights_sha256")},
            "input_channels": self.input_channels,
            "preprocess": comparable_preprocess(self.preprocess),
            "lineage": self.lineage,
        }  # fmt: skip


def comparable_preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """The preprocessing settings that decide the values of a stack (window names resolved to their HU)."""
    out = cfg.model_dump(mode="json", exclude=set(EXECUTION_ONLY))
    out["windows"] = [w.model_dump(mode="json") for w in resolve_windows(cfg)]
    return out


def preprocess_differences(model: PreprocessConfig, data: PreprocessConfig) -> list[str]:
    """`key: model value != data value` for every setting in which two preprocessings differ."""
    a, b = comparable_preprocess(model), comparable_preprocess(data)
    return [
        f"{k}: model {a.get(k)!r}, data {b.get(k)!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def _fold_number(path: Path) -> int:
    return int(re.fullmatch(r"fold-(\d+)\.json", path.name).group(1))  # type: ignore[union-attr]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelBundleError(f"{path}: unreadable ({err})") from err


def _load_folds(root: Path) -> tuple[list[FoldHead], list[dict[str, Any]]]:
    from safetensors.torch import load_file

    specs = sorted((p for p in root.glob("fold-*.json") if re.fullmatch(r"fold-\d+\.json", p.name)),
                   key=_fold_number)  # fmt: skip
    if not specs:
        raise ModelBundleError(
            f"{root}: no fold-<k>.json head files; expected a pulled head model (`slicefm models pull "
            "NAME@ALIAS --dest DIR`) or an evaluate run's heads/ directory"
        )
    folds, metas = [], []
    for path in specs:
        meta = _read_json(path)
        weights = path.with_suffix(".safetensors")
        if not weights.is_file():
            raise ModelBundleError(f"{path}: its weights {weights.name} are missing")
        spec = HeadSpec(**meta["spec"])
        head = TrainedHead(spec, load_file(str(weights)), int(meta["best_step"]), float(meta["best_score"]))
        try:
            model = head.model()  # builds and loads strictly
        except (RuntimeError, ValueError) as err:
            raise ModelBundleError(f"{weights}: does not load into its spec: {err}") from err
        thresholds = np.asarray(meta["thresholds"], dtype=np.float64)
        folds.append(FoldHead(_fold_number(path), head, thresholds, model))
        metas.append(meta)
    return folds, metas


def _agree(metas: list[dict[str, Any]], key: str, root: Path) -> Any:
    values = [m.get(key) for m in metas]
    if any(v != values[0] for v in values):
        raise ModelBundleError(f"{root}: the fold heads disagree on {key!r}; they are not one model")
    return values[0]


def _preprocess_of(metas: list[dict[str, Any]], root: Path) -> PreprocessConfig:
    recorded = _agree(metas, "preprocess", root)
    if recorded is None:
        raise ModelBundleError(
            f"{root}: the heads do not record the preprocessing their embeddings were made with (heads "
            "saved before slicefm recorded it); re-run extract and evaluate to get a head predict can apply"
        )
    try:
        cfg = PreprocessConfig.model_validate(recorded)
        resolve_windows(cfg)
    except (ValidationError, ValueError) as err:
        raise ModelBundleError(
            f"{root}: the recorded preprocessing cannot be reproduced by this slicefm: {err}"
        ) from err
    return cfg


def load_bundle(root: str | Path, *, require_encoder_version: bool = False) -> ModelBundle:
    """Read and cross-check a model directory; ModelBundleError says what is missing or inconsistent.

    `require_encoder_version`: refuse a registered head whose lineage does not name its encoder's registry
    version (predict from the registry insists on the lineage link, as the issue's registry gate does)."""
    root = Path(root)
    if not root.is_dir():
        raise ModelBundleError(f"model directory {root} does not exist")
    folds, metas = _load_folds(root)
    lineage_record = _read_json(root / LINEAGE_FILE) if (root / LINEAGE_FILE).is_file() else {}
    lineage = dict(lineage_record.get("lineage", {}))
    if require_encoder_version and not lineage.get("encoder_version"):
        raise ModelBundleError(
            f"{root}: the head's lineage names no encoder version (slicefm.encoder_version): its encoder was "
            "not registered when the head was, so which encoder made its embeddings is not recorded; "
            "register the encoder (pretrain with tracking on) and re-run evaluate"
        )
    class_names = list(_agree(metas, "class_names", root))
    windows = list(_agree(metas, "windows", root))
    embeddings = _agree(metas, "embeddings", root) or {}
    preprocess = _preprocess_of(metas, root)
    encoder, encoder_meta = _load_encoder(root, embeddings)
    input_channels = str(encoder_meta.get("input_channels") or embeddings.get("input_channels") or "stacked")
    channels = channel_names(preprocess)
    available = windows_for(channels, input_channels)
    if unknown := sorted(set(windows) - set(available)):
        raise ModelBundleError(
            f"{root}: the heads read windows {unknown}, which this preprocessing ({channels}) and encoder "
            f"({input_channels}) do not produce"
        )
    losses = {f.head.spec.loss for f in folds}
    kinds = {f.head.spec.kind for f in folds}
    if len(losses) != 1 or len(kinds) != 1:
        raise ModelBundleError(f"{root}: the fold heads mix losses {losses} or kinds {kinds}")
    n_classes = {f.head.spec.n_classes for f in folds} | {len(f.thresholds) for f in folds}
    if n_classes != {len(class_names)}:
        raise ModelBundleError(f"{root}: heads for {n_classes} classes but {len(class_names)} class names")
    return ModelBundle(
        root, str(metas[0].get("task", "")), "abmil" if kinds == {"abmil"} else "probe", class_names,
        losses.pop(), folds, windows, channels, preprocess, encoder, encoder_meta, input_channels,
        lineage,
    )  # fmt: skip


def _load_encoder(root: Path, embeddings: dict[str, Any]) -> tuple[Encoder, dict[str, Any]]:
    enc_dir = root / ENCODER_DIR
    if not all((enc_dir / name).is_file() for name in ENCODER_FILES):
        raise ModelBundleError(
            f"{root}: no encoder beside the heads ({ENCODER_DIR}/{' + '.join(ENCODER_FILES)}); a head is "
            "applied with the encoder its embeddings came from. Heads registered by slicefm carry it "
            "when their encoder version is known"
        )
    try:
        encoder, meta = load_encoder(str(enc_dir))
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelBundleError(f"{enc_dir}: the encoder does not load: {err}") from err
    expected = embeddings.get("weights_sha256")
    if expected and meta["weights_sha256"] != expected:
        raise ModelBundleError(
            f"{enc_dir}: encoder weights sha256 {meta['weights_sha256'][:12]}... are not the ones the heads' "
            f"embeddings were made with ({expected[:12]}...)"
        )
    if not expected:
        raise ModelBundleError(
            f"{root}: the heads do not record their encoder's weights hash, so the encoder beside them "
            "cannot be checked"
        )
    return encoder, meta
