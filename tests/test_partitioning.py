"""Label partitioners: deterministic, disjoint, covering; Dirichlet skews labels."""

import numpy as np
import pytest

from fedmllm.partitioning import client_samples


def _samples(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": str(i), "image": None, "text": "q", "label": int(rng.integers(0, 2))} for i in range(n)]


@pytest.mark.parametrize("cfg", [{"name": "iid"}, {"name": "dirichlet", "alpha": 0.3, "min_partition_size": 5}])
def test_partitions_are_disjoint_cover_and_repeat(cfg):
    samples = _samples()
    parts = [client_samples(samples, cfg, i, 4, seed=42) for i in range(4)]
    ids = [s["id"] for p in parts for s in p]
    assert len(ids) == len(set(ids)) == len(samples)
    again = [client_samples(samples, cfg, i, 4, seed=42) for i in range(4)]
    assert [[s["id"] for s in p] for p in parts] == [[s["id"] for s in p] for p in again]


def test_dirichlet_skews_labels_more_than_iid():
    samples = _samples(2000)

    def spread(cfg):
        rates = [np.mean([s["label"] for s in client_samples(samples, cfg, i, 4, 42)]) for i in range(4)]
        return max(rates) - min(rates)

    assert spread({"name": "dirichlet", "alpha": 0.1, "min_partition_size": 5}) > 0.3
    assert spread({"name": "iid"}) < 0.1


@pytest.mark.parametrize("name", ["easyvqa", "easyvqa_caption"])
def test_public_pool_and_client_pool_share_no_image_or_sample(name):
    from fedmllm.data import load_public, load_task

    cfg = {"name": name, "public_fraction": 0.2, "eval_samples": 50}
    _, pool, heldout = load_task(cfg, seed=42)
    public = load_public(cfg, seed=42)
    assert public and pool
    assert not {s["image"] for s in public} & {s["image"] for s in pool}
    assert not {s["id"] for s in public} & {s["id"] for s in pool}
    assert not {s["image"] for s in heldout} & ({s["image"] for s in pool} | {s["image"] for s in public})
    images = {s["image"] for s in public} | {s["image"] for s in pool}
    assert len({s["image"] for s in public}) == round(0.2 * len(images))
    # default: no public pool, the client pool is the whole training split
    _, whole, _ = load_task({"name": name, "eval_samples": 50}, seed=42)
    assert load_public({"name": name}, seed=42) == [] and len(whole) == len(pool) + len(public)
