import numpy as np
import pytest
from pydantic import ValidationError

from slicefm.evaluate.config import AbmilConfig, EvaluateConfig, ProbeConfig, SplitConfig
from slicefm.evaluate.metrics import macro
from slicefm.evaluate.protocols import apply_class_map, run_abmil_cv, run_external, run_linear_probe
from slicefm.evaluate.splits import make_splits

D = 16
CLASSES = ["liver", "lung", "bone"]




def synthetic_cohort(n_bags: int, seed: int, strength: float = 6.0):
    """Bags of 8-24 noise slices; for each positive class exactly one slice carries that class's direction."""
    rng = np.random.default_rng(seed)
    directions = np.eye(D)[: len(CLASSES)] * strength
    bags, labels, keys = [], [], []
    for _ in range(n_bags):
        n = int(rng.integers(8, 25))
        bag = rng.normal(size=(n, D)).astype(np.float32)
        y = (rng.random(len(CLASSES)) < 0.4).astype(int)
        key = []
        for c in np.flatnonzero(y):
            k = int(rng.integers(n))
            bag[k] += directions[c]
            key.append(k)
        bags.append(bag)
        labels.append(y)
        keys.append(key)
    patients = [f"p{i // 2}" for i in range(n_bags)]
    return bags, np.asarray(labels), patients, keys


def fast_cfg(**abmil) -> EvaluateConfig:
    base = dict(lr=3e-3, batch_size=16, epochs=12, patience=4, max_instances=16)
    return EvaluateConfig(
        splits=SplitConfig(n_folds=3),
        abmil=AbmilConfig(**{**base, **abmil}),
        probe=ProbeConfig(poolings=["mean", "max"], lrs=[0.1, 0.001], steps=60, eval_every=20, batch_size=16),
    )


def test_config_defaults_are_the_papers_and_unknown_keys_fail() -> None:
    cfg = EvaluateConfig()
    assert (cfg.abmil.lr, cfg.abmil.batch_size, cfg.abmil.epochs, cfg.abmil.patience) == (1e-4, 128, 32, 8)
    assert cfg.abmil.max_instances == 512 and cfg.abmil.dropout == 0.5
    assert (cfg.probe.momentum, cfg.probe.weight_decay, cfg.probe.batch_size, cfg.probe.steps) == (
        0.95,
        0,
        16,
        15000,
    )
    assert len(cfg.probe.poolings) * len(cfg.probe.lrs) == 20
    assert (cfg.splits.n_folds, cfg.splits.test_fraction, cfg.splits.holdout_min_cases) == (5, 0.2, 1000)
    with pytest.raises(ValidationError):
        EvaluateConfig(abmil={"lr": 1e-4, "learning_rate": 1})


def test_abmil_cv_learns_signal_and_attends_to_it() -> None:
    bags, labels, patients, keys = synthetic_cohort(150, seed=0)
    res = run_abmil_cv(bags, labels, patients, CLASSES, fast_cfg(), seed=0, key_slices=keys)
    assert res.splits.mode == "nested" and len(res.folds) == 3
    assert res.summary["macro"]["auroc"].mean > 0.9
    hits = total = 0
    for f in res.folds:
        assert set(f.attention) == set(f.test_index.tolist())
        for i, a in f.attention.items():
            assert a.shape == (bags[i].shape[0],) and a.sum() == pytest.approx(1.0, abs=1e-5)
            if len(keys[i]) == 1:
                total += 1
                hits += int(np.argmax(a) == keys[i][0])
    assert total > 10 and hits / total > 0.8
    oof = res.oof_scores(len(bags))
    assert not np.isnan(oof).any()  # nested: every bag is scored once out of fold
    f0 = res.folds[0]
    assert f0.thresholds.shape == (3,) and set(f0.state_dict) >= {"attn_v.weight", "mlp.3.bias"}


def test_abmil_cv_reproducible_for_a_seed() -> None:
    bags, labels, patients, keys = synthetic_cohort(60, seed=1)
    cfg = fast_cfg(epochs=3)
    a = run_abmil_cv(bags, labels, patients, CLASSES, cfg, seed=3, key_slices=keys)
    b = run_abmil_cv(bags, labels, patients, CLASSES, cfg, seed=3, key_slices=keys)
    c = run_abmil_cv(bags, labels, patients, CLASSES, cfg, seed=4, key_slices=keys)
    for fa, fb in zip(a.folds, b.folds, strict=True):
        assert np.array_equal(fa.test_scores, fb.test_scores)
        assert macro(fa.test_metrics) == macro(fb.test_metrics)
    assert not np.array_equal(a.folds[0].test_scores, c.folds[0].test_scores)


def test_cross_entropy_staging() -> None:
    bags, labels, patients, _ = synthetic_cohort(90, seed=2)
    stage = np.stack([1 - labels[:, 0], labels[:, 0]], axis=1)  # stage "III-IV" iff class-0 signal
    res = run_abmil_cv(bags, stage, patients, ["I-II", "III-IV"], fast_cfg(loss="ce"), seed=0)
    assert np.allclose(res.folds[0].test_scores.sum(axis=1), 1.0, atol=1e-5)  # softmax over the two stages
    assert res.summary["III-IV"]["auroc"].mean > 0.85


def test_linear_probe_grid_selects_by_validation_auprc() -> None:
    bags, labels, patients, _ = synthetic_cohort(90, seed=3)
    cfg = fast_cfg()
    res = run_linear_probe(bags, labels, patients, CLASSES, cfg, seed=0)
    for f in res.folds:
        assert len(f.grid) == 4
        best = max(f.grid, key=lambda g: g["val_auprc"])
        assert f.selected == {"pooling": best["pooling"], "lr": best["lr"]}
        assert f.head.spec.pooling == best["pooling"]
        assert macro(f.val_metrics)["auprc"] == pytest.approx(best["val_auprc"], abs=1e-6)
    # Max pooling sees the single signal slice; mean pooling dilutes it over up to 24 slices.
    assert all(s["pooling"] == "max" for s in res.selections)
    assert res.summary["macro"]["auroc"].mean > 0.85


def test_external_frozen_and_retrained_on_same_test_sets() -> None:
    bags_a, labels_a, patients_a, keys_a = synthetic_cohort(120, seed=4)
    cfg = fast_cfg()
    source = run_abmil_cv(bags_a, labels_a, patients_a, CLASSES, cfg, seed=0, key_slices=keys_a)
    bags_b, labels_b, patients_b, _ = synthetic_cohort(90, seed=5)
    # Cohort B knows "organ" = liver or lung (max of two source classes) and "bone".
    labels_ext = np.stack([labels_b[:, :2].max(axis=1), labels_b[:, 2]], axis=1)
    ext = run_external(
        source, bags_b, labels_ext, patients_b, ["organ", "bone"], {"organ": ["liver", "lung"]}, cfg, seed=0
    )
    assert len(ext.frozen_folds) == len(ext.retrained.folds)
    summ = ext.summaries
    assert set(summ) == {"frozen", "retrained"}
    assert summ["frozen"]["organ"]["auroc"].mean > 0.85 and summ["frozen"]["bone"]["auroc"].mean > 0.85


def test_apply_class_map_takes_max() -> None:
    s = np.array([[0.1, 0.7, 0.3], [0.6, 0.2, 0.9]])
    out = apply_class_map(s, ["a", "b", "c"], {"ab": ["a", "b"]}, ["ab", "c"])
    assert np.allclose(out, [[0.7, 0.3], [0.6, 0.9]])
    with pytest.raises(KeyError):
        apply_class_map(s, ["a", "b", "c"], {"x": "zz"}, ["x"])


def test_splits_are_reused_exactly(tmp_path) -> None:
    bags, labels, patients, _ = synthetic_cohort(60, seed=6)
    cfg = fast_cfg(epochs=2)
    splits = make_splits(labels, patients, cfg.splits, seed=11)
    res = run_abmil_cv(bags, labels, patients, CLASSES, cfg, seed=0, splits=splits)
    assert res.splits is splits
    assert [f.test_index.tolist() for f in res.folds] == [
        f.indices(patients)[2].tolist() for f in splits.folds
    ]
