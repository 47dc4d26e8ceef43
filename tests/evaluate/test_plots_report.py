import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from slicefm.evaluate.metrics import score_table, summarise_folds
from slicefm.evaluate.plots import plot_attention, plot_attention_maps, plot_roc_pr
from slicefm.evaluate.report import (
    RowKey,
    by_label,
    kfp_confusion_matrix,
    kfp_roc,
    kfp_scalar_metrics,
    render_report,
    results_table,
    to_markdown,
)


def _png_ok(path) -> None:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_attention_plot_two_windows(tmp_path) -> None:
    z = np.arange(30) * 2.5
    attn = np.random.default_rng(0).dirichlet(np.ones(60))
    path = plot_attention(
        attn, np.concatenate([z, z]), tmp_path / "a" / "scan1.png", np.repeat([0, 1], 30),
        ["abdomen", "lung"], key_slices_mm=[25.0], title="scan1",
    )  # fmt: skip
    _png_ok(path)
    with pytest.raises(ValueError):
        plot_attention(attn, z, tmp_path / "bad.png")


def test_attention_maps_per_bag(tmp_path) -> None:
    rng = np.random.default_rng(1)
    attention = {3: rng.dirichlet(np.ones(8)), 7: rng.dirichlet(np.ones(5))}
    z = {3: np.linspace(0, 35, 8), 7: np.linspace(0, 20, 5)}
    paths = plot_attention_maps(attention, tmp_path, z_mm=[z.get(i) for i in range(8)], key_slices=[[2]] * 8)
    assert [p.name for p in paths] == ["attention_bag00003.png", "attention_bag00007.png"]
    for p in paths:
        _png_ok(p)


def test_roc_pr_plots_skip_undefined_classes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((50, 3)) < 0.4).astype(int)
    y[:, 2] = 0
    paths = plot_roc_pr(y, rng.random((50, 3)), ["a b", "c", "none"], tmp_path)
    assert [p.name for p in paths] == ["roc_pr_a_b.png", "roc_pr_c.png"]
    for p in paths:
        _png_ok(p)


def _summary(seed: int):
    rng = np.random.default_rng(seed)
    tables = []
    for _ in range(3):
        y = (rng.random((40, 2)) < 0.4).astype(int)
        y[:, 1] = 0  # never positive
        tables.append(score_table(y, np.clip(y * 0.3 + rng.random((40, 2)), 0, 1), ["liver", "bone"]))
    return summarise_folds(tables)


def test_tables_and_report(tmp_path) -> None:
    rows = {"MambaOut-LECL": _summary(0), "BiomedCLIP": _summary(1)}
    table = results_table(rows, ["liver", "bone"], "auroc")
    assert table[0] == ["model / setting", "liver", "bone", "macro"]
    s = rows["MambaOut-LECL"]["liver"]["auroc"]
    assert table[1][1] == f"{s.mean:.3f} ± {s.sd:.3f}"
    assert table[1][2] == "n/a: no positives"
    assert table[1][3] == table[1][1]  # macro = the only defined class
    md, html = render_report(
        rows, ["liver", "bone"], notes=["nested 5-fold CV"], continuity={"2D": (0.43, 0.1)}
    )
    assert "| MambaOut-LECL |" in md and "## AUPRC" in md and " ± " in md
    assert "Latent continuity (cosine distance" in md and "| 2D | 0.430 ± 0.100 |" in md
    assert html.count("<table>") == 5 and "<td>n/a: no positives</td>" in html
    assert to_markdown([["a|b"], ["1"]]).startswith("| a\\|b |")


def test_row_keys_are_typed_and_labelled_only_for_display() -> None:
    key = RowKey("pretrained", "abmil")
    assert key.label == "pretrained · abmil" and RowKey.parse(key.label) == key
    assert key != "pretrained · abmil" and key != ("pretrained", "abmil")  # a key is no text, no tuple
    rows = {RowKey("random", "probe"): 1, key: 2}
    assert by_label(rows) == {"random · probe": 1, "pretrained · abmil": 2}  # order kept
    assert list(by_label(rows)) == ["random · probe", "pretrained · abmil"]
    # A label that would not parse back to its key is refused when the key is made.
    with pytest.raises(ValueError, match="ambiguous"):
        RowKey("a · b", "abmil")
    with pytest.raises(ValueError, match="ambiguous"):
        RowKey.parse("a · b · abmil")
    with pytest.raises(ValueError, match="<model> · <protocol>"):
        RowKey.parse("pretrained_abmil")


def test_kfp_structures() -> None:
    summ = _summary(0)
    flat = kfp_scalar_metrics(summ, prefix="test_")
    assert flat["test_macro_auroc_mean"] == pytest.approx(summ["macro"]["auroc"].mean)
    assert not any(k.startswith("test_bone") for k in flat)  # undefined cells are omitted, not NaN
    assert all(isinstance(v, float) and np.isfinite(v) for v in flat.values())
    y = np.array([0, 1, 1, 0, 1, -1])
    s = np.array([0.1, 0.8, 0.4, 0.35, 0.9, 0.5])
    roc = kfp_roc(y, s)
    fpr, tpr, _ = roc_curve(y[:5], s[:5])
    assert roc["fpr"] == fpr.tolist() and roc["tpr"] == tpr.tolist()
    assert all(np.isfinite(roc["thresholds"]))
    cm = kfp_confusion_matrix(y, s, 0.5)
    assert cm == {"categories": ["negative", "positive"], "matrix": [[2, 0], [1, 2]]}
