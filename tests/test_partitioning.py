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


# --- partitioner=fedmllm: FedMLLM's data_partition script ------------------------------------


def _fedmllm_script(entries, num_clients, alpha, seed=42):
    """The FedMLLM partition script's steps on entries, with its global RNGs (the reference)."""
    import random
    from collections import defaultdict

    np.random.seed(seed)
    random.seed(seed)
    by_label = defaultdict(list)
    for e in entries:
        by_label[e["label"]].append(e)
    groups = list(by_label.values())
    shares = np.random.dirichlet([alpha] * num_clients, len(groups))
    clients = [[] for _ in range(num_clients)]
    for g, group in enumerate(groups):
        n = (shares[g] * len(group)).astype(int)
        while np.any(n < 1):
            low, high = np.where(n < 1)[0], np.where(n > 1)[0]
            for c in low:
                if len(high) == 0:
                    break
                n[c] += 1
                n[high[0]] -= 1
                if n[high[0]] <= 1:
                    high = high[1:]
        n[-1] = len(group) - n[:-1].sum()
        for c, chunk in enumerate(np.split(np.array(group, dtype=object), np.cumsum(n)[:-1])):
            clients[c].extend(chunk)
    for c in clients:
        random.shuffle(c)
    return [[e["id"] for e in c] for c in clients]


@pytest.mark.parametrize("alpha,n_clients,n", [(0.5, 10, 1000), (0.1, 10, 300), (1.0, 4, 57)])
def test_fedmllm_partition_equals_the_scripts_draws(alpha, n_clients, n):
    from fedmllm.partitioning.fedmllm_split import fedmllm_partition

    samples = _samples(n, seed=3)
    samples[0]["label"] = 1  # groups follow first appearance (label 1 first), not sorted order
    got = fedmllm_partition([s["label"] for s in samples], n_clients, alpha, seed=42)
    assert [[samples[i]["id"] for i in part] for part in got] == _fedmllm_script(samples, n_clients, alpha)


def test_fedmllm_partition_properties():
    from fedmllm.partitioning.fedmllm_split import fedmllm_partition

    samples = _samples(2000, seed=1)
    labels = [s["label"] for s in samples]
    parts = fedmllm_partition(labels, 10, 0.1, seed=42)
    # disjoint, covering, deterministic; every client holds every label
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(samples))) and sum(map(len, parts)) == len(samples)
    assert parts == fedmllm_partition(labels, 10, 0.1, seed=42)
    assert parts != fedmllm_partition(labels, 10, 0.1, seed=7)
    assert all({labels[i] for i in p} == {0, 1} for p in parts)
    # clients 0..N-2 get max(floor(p * n_label), 1) minus top-up donations; the last client takes the
    # remainder: it holds exactly n_label minus what the others hold, at least its floor share
    shares = np.random.RandomState(42).dirichlet([0.1] * 10, 2)
    first_label = labels[0]
    for row, y in zip(shares, (first_label, 1 - first_label)):
        n_y = labels.count(y)
        counts = [sum(labels[i] == y for i in p) for p in parts]
        assert counts[-1] == n_y - sum(counts[:-1]) >= int(row[-1] * n_y)
        assert all(c >= 1 for c in counts)


def test_fedmllm_partition_through_client_samples_and_rare_label_error():
    from fedmllm.partitioning.fedmllm_split import fedmllm_partition

    samples = _samples(500)
    cfg = {"name": "fedmllm", "alpha": 0.5}
    parts = [client_samples(samples, cfg, i, 5, seed=42) for i in range(5)]
    expected = fedmllm_partition([s["label"] for s in samples], 5, 0.5, 42)
    assert [[s["id"] for s in p] for p in parts] == [[samples[i]["id"] for i in e] for e in expected]
    rare = [0] * 50 + [1] * 3  # 3 samples of label 1 cannot give 5 clients one each
    with pytest.raises(ValueError, match="label 1 has 3 samples.*lower num_clients or raise partitioner.alpha"):
        fedmllm_partition(rare, 5, 0.5)
