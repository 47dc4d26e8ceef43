"""Pretraining throughput: slices/s and step time split (data wait vs compute) per method and backbone.

    python benchmarks/pretrain.py --preprocessed DIR [--methods moco lecl lejepa] [--encoders vit_tiny_test]
        [--img-size 32] [--batch 16] [--steps 20] [--window 10] [--json OUT.json]

On CUDA it also prints model FLOPs utilisation (forward+backward FLOPs from torch's FLOP counter over
one step's views / measured step time / the device's bf16 peak given by --peak-tflops). No asserts.

--window N also measures the steady state: the loop's metrics of every N steps (its metrics callback, what
the pipeline logs to MLflow) and the windows after the first (CUDA start-up, loader
warm-up) averaged: "steady" slices/s, data wait and compute per step, MFU, and MFU over compute time only
(what the model would reach if the loader never made it wait). --json writes every figure per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path

import torch

from slicefm.train.config import PretrainConfig
from slicefm.train.stage import run_pretrain


def _cfg(
    method: str, encoder: str, img: int, batch: int, steps: int, workers: int, window: int = 0
) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "method": method,
            "encoder": {"name": encoder, "img_size": img},
            "optimizer": {"lr": 1e-3, "lr_scaling": "none"},
            "schedule": {"max_steps": steps, "warmup_steps": 1},
            "moco": {"proj_dim": 64, "mlp_dim": 256},
            "lejepa": {"local_size": max(16, img // 2), "n_local": 4, "proj_dim": 64, "proj_hidden": 256},
            "loader": {"batch_size": batch, "workers": workers},
            "logging": {"every_steps": window or steps, "collapse_every": steps, "collapse_batch": 16},
            "checkpoint": {"every_steps": steps},
        }
    )


def _step_flops(encoder: str, img: int, batch: int) -> float:
    """Forward + backward FLOPs of one step's trained views (bf16 autocast, torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from slicefm.models.encoders import create_encoder

    enc = create_encoder(encoder, img, 2).cuda()
    x = torch.randn(batch, 2, img, img, device="cuda")
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        enc(x).sum().backward()
    # Two views per sample through the trained branch (MoCo / LeJEPA globals); a lower bound for LeJEPA.
    return 2.0 * counter.get_total_flops()


def _mfu(flops: float | None, step_s: float, peak_tflops: float) -> float | None:
    if flops is None or not step_s or not math.isfinite(step_s):
        return None
    return flops / step_s / (peak_tflops * 1e12)


def _run(preprocessed: str, cfg: PretrainConfig, window: int, tmp: Path) -> tuple[object, list[dict]]:
    """run_pretrain, and with `window` the loop's per-window metrics (its `log_metrics` callback, the one the
    pipeline feeds to MLflow)."""
    logged: list[tuple[dict, int]] = []
    with tempfile.TemporaryDirectory(dir=tmp) as out:
        r = run_pretrain(
            preprocessed,
            out,
            cfg,
            resume=False,
            log_metrics=(lambda m, s: logged.append((dict(m), s))) if window else None,
        )
    keys = ("slices_per_s", "data_wait_s", "compute_s")
    windows = [{"step": s, **{k: m.get(k, math.nan) for k in keys}} for m, s in logged if "slices_per_s" in m]
    return r, windows


def _steady(windows: list[dict], batch: int) -> dict[str, float]:
    """Mean over the windows after the first: slices/s (from the mean step time), data wait and compute."""
    later = windows[1:]
    if not later:
        return {}
    wait = sum(w["data_wait_s"] for w in later) / len(later)
    compute = sum(w["compute_s"] for w in later) / len(later)
    return {"slices_per_s": batch / (wait + compute), "data_wait_s": wait, "compute_s": compute}


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
    p.add_argument(
        "--window", type=int, default=0, help="steady state: metrics every N steps, first one dropped"
    )
    p.add_argument("--json", help="write every figure of every run to this JSON file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {device}")
    print(
        f"{'method':8s} {'encoder':22s} {'slices/s':>9s} {'wait ms':>8s} {'compute ms':>10s} {'MFU':>6s}"
        + (
            f" {'steady/s':>9s} {'wait ms':>8s} {'compute ms':>10s} {'MFU':>6s} {'MFU cmp':>7s}"
            * bool(args.window)
        )
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for encoder in args.encoders:
                cfg = _cfg(method, encoder, args.img_size, args.batch, args.steps, args.workers, args.window)
                r, windows = _run(args.preprocessed, cfg, args.window, Path(tmp))
                step_s = args.batch / r.slices_per_s if r.slices_per_s else float("nan")
                flops = _step_flops(encoder, args.img_size, args.batch) if cuda else None
                steady = _steady(windows, args.batch)
                row = {
                    "method": method, "encoder": encoder, "img_size": args.img_size, "batch": args.batch,
                    "steps": r.steps, "precision": cfg.precision if cuda else "fp32", "workers": args.workers,
                    "slices_per_s": r.slices_per_s, "data_wait_ms": r.data_wait_s * 1e3,
                    "compute_ms": r.compute_s * 1e3, "mfu": _mfu(flops, step_s, args.peak_tflops),
                    "step_tflop": flops / 1e12 if flops is not None else None, "windows": windows,
                }  # fmt: skip
                if steady:
                    row.update(
                        steady_slices_per_s=steady["slices_per_s"],
                        steady_data_wait_ms=steady["data_wait_s"] * 1e3,
                        steady_compute_ms=steady["compute_s"] * 1e3,
                        steady_mfu=_mfu(flops, args.batch / steady["slices_per_s"], args.peak_tflops),
                        steady_mfu_compute=_mfu(flops, steady["compute_s"], args.peak_tflops),
                    )
                rows.append(row)
                print(_line(row, bool(args.window)), flush=True)
    if args.json:
        info = {"device": device, "peak_tflops": args.peak_tflops if cuda else None, "window": args.window}
        Path(args.json).write_text(json.dumps({**info, "runs": rows}, indent=1))


def _pct(x: float | None, width: int) -> str:
    return f"{x:{width}.1%}" if x is not None else "n/a".rjust(width)


def _line(row: dict, window: bool) -> str:
    text = (
        f"{row['method']:8s} {row['encoder']:22s} {row['slices_per_s']:9.1f} {row['data_wait_ms']:8.1f} "
        f"{row['compute_ms']:10.1f} {_pct(row['mfu'], 6)}"
    )
    if window:
        if "steady_slices_per_s" in row:
            text += (
                f" {row['steady_slices_per_s']:9.1f} {row['steady_data_wait_ms']:8.1f} {row['steady_compute_ms']:10.1f}"
                f" {_pct(row['steady_mfu'], 6)} {_pct(row['steady_mfu_compute'], 7)}"
            )
        else:
            text += "  (one window only: no steady state)"
    return text


if __name__ == "__main__":
    main()
