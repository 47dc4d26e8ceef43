import math

import numpy as np
import pytest
import torch

from slicefm.mil.bags import collate_bags
from slicefm.mil.pooling import POOLINGS, LearnedQueryPool, LinearProbe, make_pooling


def _batch() -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 6)).astype(np.float32) for n in (2, 5, 3)]
    return bags, *collate_bags(bags)


@pytest.mark.parametrize("name", POOLINGS)
def test_shapes_and_padding_invariance(name: str) -> None:
    torch.manual_seed(0)
    bags, x, mask = _batch()
    pool = make_pooling(name, 6)
    out = pool(x, mask)
    assert out.shape == (3, 6)
    for i, bag in enumerate(bags):
        assert torch.allclose(out[i], pool(torch.from_numpy(bag)[None], None)[0], atol=1e-5)
    probe = LinearProbe(6, 4, name)
    logits, attn = probe(x, mask)
    assert logits.shape == (3, 4) and attn is None


def test_mean_and_max_ignore_padding() -> None:
    bags, x, mask = _batch()
    x = x.masked_fill(~mask[..., None], 1e6)  # padding that would dominate if it leaked in
    assert torch.allclose(make_pooling("mean", 6)(x, mask)[0], torch.from_numpy(bags[0].mean(0)), atol=1e-5)
    assert torch.allclose(make_pooling("max", 6)(x, mask)[0], torch.from_numpy(bags[0].max(0)), atol=1e-6)


def test_learned_query_formula() -> None:
    torch.manual_seed(0)
    pool = LearnedQueryPool(6, 1)
    with torch.no_grad():
        pool.queries.normal_()
    t = torch.from_numpy(_batch()[0][1])
    q = pool.queries[0]
    w = torch.softmax(t @ q / math.sqrt(6), dim=0)
    assert torch.allclose(pool(t[None])[0], (w[:, None] * t).sum(0), atol=1e-5)


def test_avg_query_and_multi_query() -> None:
    t = torch.from_numpy(_batch()[0][1])
    w = torch.softmax(t @ t.mean(0) / math.sqrt(6), dim=0)
    assert torch.allclose(make_pooling("avg_query", 6)(t[None])[0], (w[:, None] * t).sum(0), atol=1e-5)
    torch.manual_seed(0)
    multi = LearnedQueryPool(6, 4)
    with torch.no_grad():
        multi.queries.normal_()
    per_query = []
    for q in multi.queries:
        wq = torch.softmax(t @ q / math.sqrt(6), dim=0)
        per_query.append((wq[:, None] * t).sum(0))
    assert torch.allclose(multi(t[None])[0], torch.stack(per_query).mean(0), atol=1e-5)
    assert make_pooling("multi_query", 6).queries.shape == (4, 6)
    with pytest.raises(ValueError):
        make_pooling("gem", 6)
