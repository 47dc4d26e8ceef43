"""The pretraining stage end to end on CPU: every method learns, exact resume, collapse, export, presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slicefm.config import PipelineConfig
from slicefm.core.store import open_store
from slicefm.models.encoders import create_encoder
from slicefm.models.export_format import load_encoder
from slicefm.train.checkpoint import LATEST_KEY, CheckpointError
from slicefm.train.collapse import CollapseError, CollapseMonitor, effective_rank
from slicefm.train.config import PretrainConfig, load_pretrain_config
from slicefm.train.data import load_index
from slicefm.train.distributed import DistContext
from slicefm.train.methods import build_method
from slicefm.train.optim import LARS
from slicefm.train.stage import run_pretrain
from tests.train.conftest import tiny_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
PRESETS = [
    "clear-mambaout-lecl0",
    "clear-vitb-moco",
    "dale-vitl-lejepa-0",
    "dale-vitl-lejepa-1s",
    "dale-vitl-lejepa-2s",
]


@pytest.mark.parametrize(
    ("method", "name", "steps", "extra"),
    [
        ("moco", "vit_conv_tiny_test", 40, {}),
        # 80 steps: eval-mode bank keys make the lesion term bite first (the loss rises for ~40 steps).
        ("lecl", "mambaout_tiny_test", 80, {}),
        ("lejepa", "vit_tiny_test", 16, {}),
        ("lejepa", "vit_tiny_test", 30, {"aux": {"mode": "2S"}}),
    ],
)
def test_tiny_run_lowers_its_loss(
    preprocessed: str, out_dir: str, method: str, name: str, steps: int, extra: dict
) -> None:
    cfg = tiny_config(method, name, steps=steps, optimizer={"lr": 3e-3}, **extra)
    logged: list[tuple[int, dict[str, float]]] = []
    result = run_pretrain(
        preprocessed, out_dir, cfg, resume=False, log_metrics=lambda m, step: logged.append((step, m))
    )
    assert result.steps == steps
    # The caller's callback gets every logging window (every 5 steps and the last) with the method's loss terms.
    windows = [(step, m) for step, m in logged if "loss" in m]
    assert [step for step, _ in windows] == sorted({*range(5, steps + 1, 5), steps})
    terms = {"inv", "sigreg", "sigreg_collapse", "aux"}
    assert all((terms <= set(m)) == (method == "lejepa") for _, m in windows)
    assert [step for step, m in logged if "eff_rank" in m] == [step for step, _ in windows]
    assert result.loss_last < result.loss_first, (result.loss_first, result.loss_last)
    assert result.slices_per_s > 0 and result.collapse["eff_rank"] > 1
    encoder, meta = load_encoder(out_dir)
    assert meta["method"] == method and meta["channels"] == ["abdomen", "lung"] and meta["encoder"] == name


def test_resume_after_kill_is_bitwise_identical(preprocessed: str, tmp_path: Path) -> None:
    cfg = tiny_config("lecl", "vit_tiny_test", steps=12, checkpoint={"every_steps": 4})
    full = run_pretrain(preprocessed, str(tmp_path / "full"), cfg, resume=False)
    killed = tmp_path / "killed"
    # "Kill" after step 6: the last checkpoint is at step 4, so steps 5-6 are redone after the restart.
    partial = run_pretrain(preprocessed, str(killed), cfg, resume=False, stop_after=6)
    assert partial.steps == 6 and not (killed / "encoder.safetensors").exists()
    resumed = run_pretrain(preprocessed, str(killed), cfg, resume=True)
    assert resumed.steps == 12 and resumed.final_loss == full.final_loss
    a = torch.load(tmp_path / "full" / LATEST_KEY, weights_only=False)
    b = torch.load(killed / LATEST_KEY, weights_only=False)
    assert a["losses"] == b["losses"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["extra"]["bank"]["bank"], b["extra"]["bank"]["bank"])
    # A checkpoint of another run is refused.
    with pytest.raises(CheckpointError):
        run_pretrain(preprocessed, str(killed), tiny_config("moco", "vit_tiny_test", steps=12))


def test_collapse_detection_fires_on_constant_encoder() -> None:
    encoder = create_encoder("vit_tiny_test", 32, 2)
    x = torch.rand(48, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    projector = torch.nn.Linear(encoder.embed_dim, 16)
    healthy = CollapseMonitor(min_rank=2.0, max_sigreg=0.5, patience=2)
    metrics = healthy.check(encoder, x, 1, projector, sigreg_collapse=0.1)
    assert metrics["eff_rank"] > 2 and metrics["proj_eff_rank"] > 2 and healthy.consecutive == 0
    assert encoder.training and projector.training  # modes restored after the eval-mode check
    # A high scale-free SIGReg alone marks a check collapsed.
    assert healthy.check(encoder, x, 2, sigreg_collapse=0.9) and healthy.consecutive == 1
    with torch.no_grad():  # final LayerNorm with zero gain: every slice maps to its bias
        encoder.trunk.norm.weight.zero_()
        encoder.trunk.norm.bias.normal_()
    assert effective_rank(encoder(x)) == 0.0
    monitor = CollapseMonitor(min_rank=2.0, max_sigreg=0.5, patience=2)
    monitor.check(encoder, x, 1)
    with pytest.raises(CollapseError, match="collapse at step 2: backbone effective rank 0.00"):
        monitor.check(encoder, x, 2)
    warn = CollapseMonitor(min_rank=2.0, max_sigreg=0.5, patience=1, action="warn")
    warn.check(encoder, x, 1)
    assert warn.consecutive == 1


def test_effective_rank_counts_spread_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    # k orthogonal directions with equal spread (and a large shared constant, like a ViT's CLS): rank ~k.
    for k in (1, 4, 16):
        basis = torch.linalg.qr(torch.randn(64, k, generator=gen))[0]
        emb = 1.0 + torch.randn(2048, k, generator=gen) @ basis.T * 0.05  # normalised std ~0.005
        assert effective_rank(emb) == pytest.approx(k, rel=0.08), k
    assert effective_rank(torch.randn(2048, 64, generator=gen)) > 55


def test_lecl_bank_keys_are_encoded_in_eval_mode(preprocessed: str) -> None:
    cfg = tiny_config("lecl", "vit_tiny_test")
    index = load_index(open_store(preprocessed), cfg.loader.exclude_splits)
    method = build_method(cfg, index, DistContext())
    assert method.bank is not None and len(method.key_items) >= 3
    method.model.train()
    bn = [m for m in method.model.momentum_projector.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    before = [m.running_mean.clone() for m in bn]
    alone = method._bank_keys(np.array([0]))
    with_others = method._bank_keys(np.array([0, 1, 2]))
    # A key does not depend on the other slices of its refresh batch, and the running statistics stay put.
    torch.testing.assert_close(alone[0], with_others[0])
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bn, before, strict=True))
    assert method.model.momentum_projector.training  # train mode restored
    # The training keys themselves stay train-mode (batch statistics), as moco-v3 trains them.
    trained = method.model.encode_keys(method._key_slices(np.array([0, 1, 2])))
    assert not torch.allclose(trained[0], with_others[0])


def test_export_load_round_trip_gives_identical_embeddings(preprocessed: str, out_dir: str) -> None:
    cfg = tiny_config("moco", "vit_conv_tiny_test", steps=2)
    run_pretrain(preprocessed, out_dir, cfg, resume=False)
    ckpt = torch.load(Path(out_dir) / LATEST_KEY, weights_only=False)
    trained = create_encoder("vit_conv_tiny_test", 32, 2)
    trained.load_state_dict(
        {k[len("base_encoder.") :]: v for k, v in ckpt["model"].items() if k.startswith("base_encoder.")}
    )
    trained.eval()
    loaded, meta = load_encoder(out_dir)
    x = torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(trained(x), loaded(x))
    assert meta["img_size"] == 32 and meta["in_chans"] == 2 and meta["embed_dim"] == 64
    assert meta["format_version"] == 1 and meta["config"]["method"] == "moco"


def test_lars_scales_weight_updates_by_trust_ratio() -> None:
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))
    b = torch.nn.Parameter(torch.ones(2))
    opt = LARS([{"params": [w, b]}], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.1)
    w.grad, b.grad = torch.full((2, 2), 8.0), torch.full((2,), 3.0)
    opt.step()
    # ||w|| = 4, ||g|| = 16: update = g * 0.1 * 4 / 16 = 0.2; biases are plain SGD.
    np.testing.assert_allclose(w.detach().numpy(), 1.8)
    np.testing.assert_allclose(b.detach().numpy(), -2.0)


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for every non-mapping value of a nested mapping (`overrides` dicts included)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_validate(preset: str) -> None:
    data = yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text())
    assert set(data) == {"pretrain"}
    cfg = load_pretrain_config(data)
    # Every value the preset sets reaches the config unchanged (none dropped or coerced to something else),
    # and every field it leaves out takes PretrainConfig's default.
    got, defaults = _leaves(cfg.model_dump(mode="json")), _leaves(PretrainConfig().model_dump(mode="json"))
    set_by_preset = _leaves(data["pretrain"])
    assert set_by_preset and set(set_by_preset) <= set(got)
    # (PyYAML reads 1e-4 without a dot as a string; pydantic's number parsing of it is intended.)
    expected = {
        k: float(v) if isinstance(v, str) and isinstance(got[k], float) else v
        for k, v in set_by_preset.items()
    }
    assert {k: got[k] for k in set_by_preset} == expected
    assert {k: v for k, v in got.items() if k not in set_by_preset} == {
        k: v for k, v in defaults.items() if k not in set_by_preset
    }
    # A preset is also a whole pipeline config (other sections default), usable as CONFIG=... make run-pipeline.
    assert PipelineConfig.model_validate(data).pretrain == cfg
    with pytest.raises(ValueError):
        PretrainConfig.model_validate({**data["pretrain"], "unknown_key": 1})


def test_demo_pipeline_config_pretrains_a_tiny_encoder() -> None:
    data = yaml.safe_load((CONFIGS / "demo-cpu.yaml").read_text())
    cfg = PipelineConfig.model_validate(data)
    assert (
        cfg.pretrain.encoder.img_size == cfg.preprocess.size
    )  # the encoder sees the preprocessed slices as is
    # The channels pretraining gives the encoder (slicefm.train.data.PretrainIndex.in_chans): CLEAR's
    # per_window embeds each HU window as its own 1-channel image, "stacked" has one channel per window.
    channels = 1 if cfg.pretrain.input_channels == "per_window" else len(cfg.preprocess.windows)
    enc = create_encoder(
        cfg.pretrain.encoder.name, cfg.pretrain.encoder.img_size, channels, **cfg.pretrain.encoder.overrides
    )
    with torch.no_grad():
        emb = enc(torch.rand(2, channels, cfg.preprocess.size, cfg.preprocess.size))
    assert emb.shape == (2, enc.embed_dim) and torch.isfinite(emb).all()


# The papers' widths: ViT-L 1024, ViT-B 768, MambaOut-Tiny 576 (last stage).
PRESET_WIDTHS = {
    "clear-mambaout-lecl0": 576,
    "clear-vitb-moco": 768,
    "dale-vitl-lejepa-0": 1024,
    "dale-vitl-lejepa-1s": 1024,
    "dale-vitl-lejepa-2s": 1024,
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_their_encoders(preset: str) -> None:
    cfg = load_pretrain_config(yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text()))
    enc = create_encoder(cfg.encoder.name, cfg.encoder.img_size, 2, **cfg.encoder.overrides)
    assert enc.embed_dim == PRESET_WIDTHS[preset]
    if enc.is_vit:  # the slice size is a whole number of patches (ViT-L/14 at 252: 18 x 18)
        patch = enc.trunk.patch_embed.patch_size
        assert cfg.encoder.img_size % patch[0] == 0 and cfg.encoder.img_size % patch[1] == 0
