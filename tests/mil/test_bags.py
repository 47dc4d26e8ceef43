import numpy as np
import pytest
import torch

from slicefm.mil.bags import collate_bags, subsample_indices


def test_collate_pads_and_masks() -> None:
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 4)).astype(np.float32) for n in (3, 1, 5)]
    x, mask = collate_bags(bags)
    assert x.shape == (3, 5, 4) and mask.shape == (3, 5)
    assert mask.sum(dim=1).tolist() == [3, 1, 5]
    assert torch.equal(x[0, :3], torch.from_numpy(bags[0]))
    assert torch.count_nonzero(x[1, 1:]) == 0
    with pytest.raises(ValueError):
        collate_bags([np.zeros((0, 4), np.float32)])


def test_subsample_keeps_key_slices_and_is_seeded() -> None:
    keep = [3, 700, 701]
    a = subsample_indices(1000, 512, np.random.default_rng(1), keep)
    b = subsample_indices(1000, 512, np.random.default_rng(1), keep)
    c = subsample_indices(1000, 512, np.random.default_rng(2), keep)
    assert a.size == 512 and np.unique(a).size == 512
    assert set(keep) <= set(a.tolist())
    assert np.all(np.diff(a) > 0)  # z order preserved
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(subsample_indices(10, 512, np.random.default_rng(0)), np.arange(10))
