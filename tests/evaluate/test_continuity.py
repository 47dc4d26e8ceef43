import numpy as np
import pytest

from slicefm.evaluate.continuity import latent_continuity, mean_continuity


def test_straight_line_l2_is_one_and_cosine_matches_hand_computation() -> None:
    line = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    assert latent_continuity(line, "l2") == pytest.approx(1.0)
    # Unit vectors at 0, 45 and 90 degrees: cosine distances 1-cos45 per step, 1-cos90 = 1 end to end.
    arc = np.array([[1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)], [0.0, 1.0]])
    step = 1 - np.sqrt(0.5)
    assert latent_continuity(arc) == pytest.approx(1.0 / (2 * step))  # ~1.71: cosine can exceed 1
    assert latent_continuity(arc, "l2") == pytest.approx(np.sqrt(2) / (2 * np.sqrt(2 - np.sqrt(2))))


def test_back_and_forth_is_low_and_l2_bounded() -> None:
    rng = np.random.default_rng(0)
    zigzag = np.array([[1.0, 0.0], [0.0, 1.0]] * 5 + [[1.0, 0.1]])
    assert latent_continuity(zigzag) < 0.05
    walk = rng.normal(size=(50, 8))
    assert 0 < latent_continuity(walk, "l2") <= 1.0


def test_mean_over_scans_and_degenerate_scans() -> None:
    line = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    zz = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    mean, sd, n = mean_continuity([line, zz, np.ones((1, 2))], "l2")
    assert n == 2 and mean == pytest.approx(0.5) and sd == pytest.approx(np.std([1.0, 0.0], ddof=1))
    assert np.isnan(latent_continuity(np.ones((3, 2)), "l2"))  # no movement: undefined, not 0
    with pytest.raises(ValueError):
        latent_continuity(line, "manhattan")
