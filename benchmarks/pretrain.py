"""Pretraining throughput: slices/s and step time split (data wait vs compute) per method and backbone.

    python benchmarks/pretrain.py --preprocessed DIR [--methods moco lecl lejepa] [--encoders vit_tiny_test]
        [--img-size 32] [--batch 16] [--steps 20]

On CUDA it also prints model FLOPs utilisation (forward+backward FLOPs from torch's FLOP counter over
one step's views / measured step time / the device's bf16 peak given by --peak-tflops). No asserts.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

from slicefm.train.config import PretrainConfig
from slicefm.train.stage import run_pretrain


def _cfg(method: str, encoder: str, img: int, batch: int, steps: int, workers: int) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "method": method,
            "encoder": {"name": encoder, "img_size": img},
            "optimizer": {"lr": 1e-3, "lr_scaling": "none"},
            "schedule": {"max_steps": steps, "warmup_steps": 1},
            "moco": {"proj_dim": 64, "mlp_dim": 256},
            "lejepa": {"local_size": max(16, img // 2), "n_local": 4, "proj_dim": 64, "proj_hidden": 256},
            "loader": {"batch_size": batch, "workers": workers},
            "logging": {"every_steps": steps, "collapse_every": steps, "collapse_batch": 16},
            "checkpoint": {"every_steps": steps},
        }
    )


def _mfu(encoder: str, img: int, batch: int, step_s: float, peak_tflops: float) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from slicefm.models.encoders import create_encoder

    enc = create_encoder(encoder, img, 2).cuda()
    x = torch.randn(batch, 2, img, img, device="cuda")
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        enc(x).sum().backward()
    # Two views per sample through the trained branch (MoCo / LeJEPA globals); a lower bound for LeJEPA.
    return 2 * counter.get_total_flops() / step_s / (peak_tflops * 1e12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preprocessed", required=True)
    p.add_argument("--methods", nargs="+", default=["moco", "lecl", "lejepa"])
    p.add_argument("--encoders", nargs="+", default=["vit_tiny_test", "mambaout_tiny_test"])
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}")
    print(f"{'method':8s} {'encoder':22s} {'slices/s':>9s} {'wait ms':>8s} {'compute ms':>10s} {'MFU':>6s}")
    for method in args.methods:
        for encoder in args.encoders:
            cfg = _cfg(method, encoder, args.img_size, args.batch, args.steps, args.workers)
            with tempfile.TemporaryDirectory() as out:
                r = run_pretrain(args.preprocessed, out, cfg, resume=False)
            step_s = args.batch / r.slices_per_s if r.slices_per_s else float("nan")
            mfu = (
                _mfu(encoder, args.img_size, args.batch, step_s, args.peak_tflops)
                if torch.cuda.is_available()
                else None
            )
            wait_ms, compute_ms = r.data_wait_s * 1e3, r.compute_s * 1e3
            mfu_txt = f"{mfu:6.1%}" if mfu is not None else "   n/a"
            print(
                f"{method:8s} {encoder:22s} {r.slices_per_s:9.1f} {wait_ms:8.1f} {compute_ms:10.1f} {mfu_txt}"
            )


if __name__ == "__main__":
    main()
