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


def _fedmllm_script(entries, num_clients, alpha, seed=42, label_key="label", id_key="id", topup_all=True):
    """FedMLLM's data_partition_*.py steps on entries, with its global RNGs (the reference).
    data_partition_hateful.py tops up every label group; data_partition_crisismmd.py only the first
    (`if label_idx == 0`: topup_all=False), groups by `label_image` and names rows by `image_id`."""
    import random
    from collections import defaultdict

    np.random.seed(seed)
    random.seed(seed)
    by_label = defaultdict(list)
    for e in entries:
        by_label[e[label_key]].append(e)
    groups = list(by_label.values())
    shares = np.random.dirichlet([alpha] * num_clients, len(groups))
    clients = [[] for _ in range(num_clients)]
    for g, group in enumerate(groups):
        n = (shares[g] * len(group)).astype(int)
        while (topup_all or g == 0) and np.any(n < 1):
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
    return [[e[id_key] for e in c] for c in clients]


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


# --- FedMLLM's CrisisMMD script --------------------------------------------------------------


def _crisismmd_script(tsv_path, num_clients, alpha):
    """FedMLLM's data_partition_crisismmd.py on a CrisisMMD TSV: its rows as csv.DictReader reads
    them, grouped by `label_image`, the first group alone topped up. Each client's image_ids."""
    import csv

    with open(tsv_path, encoding="utf-8") as f:
        data = list(csv.DictReader(f, delimiter="\t"))
    return _fedmllm_script(data, num_clients, alpha, label_key="label_image", id_key="image_id", topup_all=False)


def _crisismmd_with_rare_label(root, n_rows=120, rare="missing_or_found_people", n_rare=2):
    """A CrisisMMD folder in the real format whose `rare` label_image appears `n_rare` times (fewer
    than the clients), never first: the label the Hateful Memes script would fail on."""
    from fedmllm.data.fixtures import write_crisismmd

    root = write_crisismmd(root, "humanitarian", n_rows=n_rows, seed=4)
    tsv = root / "crisismmd_datasplit_all" / "task_humanitarian_text_img_train.tsv"
    lines = tsv.read_text(encoding="utf-8").splitlines()
    col = lines[0].split("\t").index("label_image")
    seen = 0
    for i, line in enumerate(lines[1:], 1):
        fields = line.split("\t")
        if fields[col] == rare:
            seen += 1
            if seen > n_rare:
                fields[col] = "not_humanitarian"
        lines[i] = "\t".join(fields)
    assert lines[1].split("\t")[col] != rare
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, tsv


def test_crisismmd_partition_equals_fedmllms_script_with_a_rare_label(tmp_path):
    """Sample by sample against the transcription, with a label rarer than the clients: tops up
    only the first label group, never fails, and some client holds none of the rare label."""
    from fedmllm.data import load_task
    from fedmllm.partitioning.fedmllm_split import fedmllm_partition

    root, tsv = _crisismmd_with_rare_label(tmp_path / "cm")
    cfg = {"name": "crisismmd", "root": str(root), "task": "humanitarian", "eval_samples": 0}
    task, pool, _ = load_task(cfg)
    labels = [s["label"] for s in pool]
    assert labels.count(task.labels.index("missing_or_found_people")) == 2
    parts = fedmllm_partition(labels, 10, 0.5, seed=42, topup="first")
    expected = _crisismmd_script(tsv, 10, 0.5)
    assert [[pool[i]["id"] for i in p] for p in parts] == expected
    rare = task.labels.index("missing_or_found_people")
    assert sum(any(labels[i] == rare for i in p) for p in parts) <= 2  # 8 clients hold none of it
    assert all(any(labels[i] == labels[0] for i in p) for p in parts)  # the first group was topped up
    with pytest.raises(ValueError, match="label 3 has 2 samples"):  # Hateful Memes' rule: every label
        fedmllm_partition(labels, 10, 0.5, seed=42, topup="all")


def test_partition_command_on_crisismmd_matches_fedmllms_script(tmp_path, capsys):
    """`fedmllm partition dataset=crisismmd partitioner=fedmllm` takes the CrisisMMD script's rule
    from the dataset (no partitioner.topup on the command line) and writes its split."""
    import json

    from fedmllm.cli import main

    root, tsv = _crisismmd_with_rare_label(tmp_path / "cm")
    main(
        [
            "partition",
            "dataset=crisismmd",
            f"dataset.root={root}",
            "partitioner=fedmllm",
            "num_clients=10",
            f"out={tmp_path / 'out'}",
        ]
    )
    target = tmp_path / "out" / "crisismmd" / "aligned" / "partition-alpha0.5-clt10"
    assert f"partition dir: {target}" in capsys.readouterr().out
    got = [
        [json.loads(line)["id"] for line in (target / f"client_{i}.jsonl").read_text().splitlines()] for i in range(10)
    ]
    assert got == _crisismmd_script(tsv, 10, 0.5)
    stats = json.loads((target / "stats.json").read_text())
    assert [r["num_samples"] for r in stats] == [len(g) for g in got]


def test_a_runs_client_rows_weigh_each_client_by_its_partition_size(tmp_path):
    """metrics.jsonl's per-client rows: each client's num-examples is its partition's size in the
    stats.json that `fedmllm partition` writes with the same settings (not local_steps x batch)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_overrides
    from inprocess import run_in_process

    from fedmllm.config import compose
    from fedmllm.partitioning.materialise import write_partitions
    from fedmllm.tracking import read_metrics

    overrides = tiny_overrides(
        "server_stage=none",
        "dataset.eval_samples=4",
        "num_rounds=1",
        "num_clients=3",
        "clients_per_round=3",
        "train.local_steps=1",
        "partitioner.alpha=0.3",
    )
    run = run_in_process([*overrides, f"out_dir={tmp_path / 'run'}"])
    target, _ = write_partitions(compose(overrides), tmp_path / "parts")
    sizes = [r["num_samples"] for r in json.loads((target / "stats.json").read_text())]
    assert len(set(sizes)) > 1  # unequal partitions: equal weights would be a different average
    rows = read_metrics(run)[1]["clients"]
    assert [r["partition-id"] for r in rows] == [0, 1, 2]
    assert [r["num-examples"] for r in rows] == sizes
    assert all(r["bytes"] > 0 and isinstance(r["train-loss"], float) for r in rows)
