"""One scan's preprocessed stack -> slice embeddings -> fold heads -> class probabilities (and attention).

The computation is the pipeline's, step for step: `encoder_inputs` turns stored slices into encoder inputs
as extract does, embeddings are rounded to float16 as extract stores them, windows are concatenated into a
bag in the head's window order as `EmbeddingSet.bags` does, and each fold head scores it with
`predict_logits` as the evaluate stage does. `slicefm predict` and the served pyfunc model both call
`score_stack`, so they agree by construction (and tests hold both to the evaluate stage's predictions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slicefm.embed.extract import encoder_inputs, windows_for
from slicefm.evaluate.train_head import predict_logits, to_probabilities
from slicefm.predict.bundle import ModelBundle


@dataclass
class ScanScores:
    """Per-class probabilities of one scan: the fold ensemble's mean, each fold's, and attention weights."""

    probabilities: np.ndarray  # [C], mean over fold heads
    by_fold: np.ndarray  # [K, C]
    labels: np.ndarray  # [C] int, probabilities >= the ensemble's thresholds
    attention: np.ndarray | None  # [n_instances] mean over folds (ABMIL), instances = windows x slices
    window_index: np.ndarray  # [n_instances] which window each instance is


def inference_device(precision: str = "auto") -> tuple[torch.device, bool]:
    """CUDA (bf16 autocast unless precision is "fp32") when present, else CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), precision in ("auto", "bf16")
    return torch.device("cpu"), precision == "bf16"


@torch.inference_mode()
def embed_stack(
    bundle: ModelBundle,
    stack: np.ndarray,
    batch_size: int = 64,
    device: torch.device | None = None,
    bf16: bool = False,
) -> list[np.ndarray]:
    """Stack [n, C, H, W] (or [n, T, C, H, W] 5-cut tiles) as preprocess stores it -> one float16 [n, T*D]
    matrix per window the head reads, in the head's window order."""
    device = device or torch.device("cpu")
    check_stack(bundle, stack)
    encoder = bundle.encoder.to(device).eval()
    in_chans = int(bundle.encoder_meta["in_chans"])
    names = windows_for(bundle.channels, bundle.input_channels)
    tiles = stack.shape[1] if stack.ndim == 5 else 1
    step = max(1, batch_size // tiles)  # slices per chunk: about batch_size images per forward
    parts: dict[str, list[torch.Tensor]] = {w: [] for w in bundle.windows}
    for start in range(0, stack.shape[0], step):
        # The chunk travels as stored (uint8) and becomes float encoder inputs on the device, as in extract.
        chunk = torch.from_numpy(np.ascontiguousarray(stack[start : start + step])).to(device)
        for name, images in zip(names, encoder_inputs(chunk, bundle.input_channels, in_chans), strict=True):
            if name in parts:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    pooled = encoder(images)
                parts[name].append(pooled.to(torch.float16).cpu().reshape(chunk.shape[0], -1))
    out = {name: torch.cat(p).numpy() for name, p in parts.items()}
    return [out[w] for w in bundle.windows]


def check_stack(bundle: ModelBundle, stack: np.ndarray) -> None:
    """Refuse a stack whose shape or dtype is not what the model's preprocessing makes (ValueError)."""
    cfg = bundle.preprocess
    expected_dtype = np.float16 if cfg.normalisation == "zscore" else np.uint8
    lead = (5,) if cfg.five_cut else ()
    ndim = 3 + len(lead) + 1
    if stack.ndim != ndim or stack.shape[0] < 1 or tuple(stack.shape[1 : 1 + len(lead)]) != lead:
        layout = "[slices, 5, channels, H, W]" if cfg.five_cut else "[slices, channels, H, W]"
        raise ValueError(f"a preprocessed stack for this model is {layout}; got shape {tuple(stack.shape)}")
    c, h, w = stack.shape[-3:]
    if c != len(bundle.channels):
        raise ValueError(
            f"the model's preprocessing makes {len(bundle.channels)} channels {bundle.channels}; got {c}"
        )
    if cfg.size is not None and (h, w) != (cfg.size, cfg.size):
        raise ValueError(f"the model's preprocessing makes {cfg.size}x{cfg.size} slices; got {h}x{w}")
    if np.dtype(stack.dtype) != np.dtype(expected_dtype):
        raise ValueError(
            f"the model's preprocessing stores {np.dtype(expected_dtype).name} slices; got {stack.dtype}"
        )
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():  # uint8 windows are finite by type
        raise ValueError("the stack holds non-finite values")


def score_bag(bundle: ModelBundle, windows: list[np.ndarray]) -> ScanScores:
    """Per-window embeddings [n, d] (float16, head window order) -> the fold heads' probabilities."""
    for name, m in zip(bundle.windows, windows, strict=True):
        if not np.isfinite(m).all():
            raise ValueError(f"window {name}: non-finite embeddings (overflow in float16?)")
    bag = np.concatenate(windows, axis=0)
    window_index = np.repeat(np.arange(len(windows)), [m.shape[0] for m in windows])
    by_fold, attention = [], []
    for fold in bundle.folds:
        logits, attn = predict_logits(fold.model, [bag], batch_size=1)
        by_fold.append(to_probabilities(logits, fold.head.spec.loss)[0])
        if attn is not None:
            attention.append(attn[0])
    probs = np.mean(by_fold, axis=0)
    return ScanScores(
        probs, np.stack(by_fold), (probs >= bundle.thresholds).astype(np.int64),
        np.mean(attention, axis=0) if attention else None, window_index,
    )  # fmt: skip


def score_stack(
    bundle: ModelBundle,
    stack: np.ndarray,
    batch_size: int = 64,
    device: torch.device | None = None,
    bf16: bool = False,
) -> ScanScores:
    """One scan's preprocessed stack -> its scores (see the module docstring)."""
    return score_bag(bundle, embed_stack(bundle, stack, batch_size, device, bf16))
