"""Modality scenarios (FedMLLM's client sets and rates), eval.scenario, `fedmllm partition`,
the data-dir round trip and empty partitions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmllm.config import ConfigError, NodeIdentity, compose
from fedmllm.data.schema import Task, modality
from fedmllm.partitioning.scenarios import (
    apply_eval_scenario,
    apply_scenario,
    hybrid_presence,
    image_only_clients,
    scenario_tag,
)

TASK = Task("synthetic", labels=("no", "yes"), instruction="Answer yes or no.")


def _samples(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"id": f"s{i}", "image": f"img/{i}.png", "text": f"text {i}", "label": int(rng.integers(0, 2))}
        for i in range(n)
    ]


def _mix(samples):
    out = dict.fromkeys(("both", "image", "text", "none"), 0)
    for s in samples:
        out[modality(s)] += 1
    return out


def _within(count, n, p, sigmas=4.0):
    """A binomial count within `sigmas` standard deviations of n * p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --- FedMLLM's client sets (num_clients=10, seed=42) -----------------------------------------


@pytest.mark.parametrize("k,expected", [(3, {0, 1, 4}), (5, {0, 1, 4, 6, 9}), (7, {0, 1, 4, 5, 6, 8, 9})])
def test_cross_image_clients_are_fedmllms(k, expected):
    assert image_only_clients(10, k, seed=42) == expected
    samples = _samples(20)
    for c in range(10):
        mix = _mix(apply_scenario(samples, {"name": "cross", "image_clients": k}, c, 10, seed=42))
        assert mix == (
            {"both": 0, "image": 20, "text": 0, "none": 0}
            if c in expected
            else {"both": 0, "image": 0, "text": 20, "none": 0}
        )


def test_hybrid_client_sets_are_fedmllms():
    presence = hybrid_presence(10, 0.4, seed=42)
    kind = {
        c: {(1, 1): "both", (1, 0): "image", (0, 1): "text", (0, 0): "neither"}[tuple(presence[c])] for c in range(10)
    }
    assert {c for c, v in kind.items() if v == "image"} == {0, 3, 5}
    assert {c for c, v in kind.items() if v == "text"} == {1, 6}
    assert {c for c, v in kind.items() if v == "neither"} == {4}
    assert {c for c, v in kind.items() if v == "both"} == {2, 7, 8, 9}
    samples = _samples(2000)
    cfg = {"name": "hybrid", "qrate": 0.4}
    mixes = {c: _mix(apply_scenario(samples, cfg, c, 10, seed=42)) for c in range(10)}
    for c in (0, 3, 5):
        assert mixes[c]["image"] == 2000
    for c in (1, 6):
        assert mixes[c]["text"] == 2000
    for c in (2, 7, 8, 9):
        assert mixes[c]["both"] == 2000
    # neither: every sample gets exactly one modality, image or text at 50/50
    assert mixes[4]["both"] == mixes[4]["none"] == 0
    assert _within(mixes[4]["image"], 2000, 0.5)


@pytest.mark.parametrize("m", [0.3, 0.5, 0.7])
def test_missing_rates_match_the_definition(m):
    n = 20_000
    mix = _mix(apply_scenario(_samples(n), {"name": "missing", "mrate": m}, 0, 10, seed=42))
    keep = 1 - m
    # m=0.3: 49% both, 21% text only, 21% image only, 9% neither
    for key, p in (("both", keep * keep), ("text", keep * m), ("image", m * keep), ("none", m * m)):
        assert _within(mix[key], n, p), (key, mix[key], n * p)


def test_missing_extremes_and_clients_draw_differently():
    samples = _samples(200)
    assert _mix(apply_scenario(samples, {"name": "missing", "mrate": 0.0}, 3, 10, 42))["both"] == 200
    assert _mix(apply_scenario(samples, {"name": "missing", "mrate": 1.0}, 3, 10, 42))["none"] == 200
    a = apply_scenario(samples, {"name": "missing", "mrate": 0.5}, 0, 10, 42)
    b = apply_scenario(samples, {"name": "missing", "mrate": 0.5}, 1, 10, 42)
    assert [modality(s) for s in a] != [modality(s) for s in b]


def test_scenarios_return_copies_and_keep_other_fields():
    samples = _samples(50)
    before = json.dumps(samples)
    for cfg in (
        {"name": "aligned"},
        {"name": "missing", "mrate": 0.9},
        {"name": "cross", "image_clients": 5},
        {"name": "hybrid", "qrate": 0.9},
    ):
        out = apply_scenario(samples, cfg, 4, 10, 42)
        assert all(o is not s for o, s in zip(out, samples))
        assert [(o["id"], o["label"]) for o in out] == [(s["id"], s["label"]) for s in samples]
    assert json.dumps(samples) == before
    with pytest.raises(ValueError, match="scenario='nope': choose one of aligned, missing, cross, hybrid"):
        apply_scenario(samples, {"name": "nope"}, 0, 10, 42)


_DRAW = """
import json, sys
from fedmllm.partitioning.scenarios import apply_scenario
samples = [{"id": str(i), "image": "a.png", "text": "t", "label": 0} for i in range(300)]
out = {}
for c in map(int, sys.argv[1:]):
    for cfg in ({"name": "missing", "mrate": 0.4}, {"name": "hybrid", "qrate": 0.4}):
        out[f"{cfg['name']}-{c}"] = [(s["image"] is None, s["text"] is None) for s in apply_scenario(samples, cfg, c, 10, 42)]
print(json.dumps(out, sort_keys=True))
"""


def test_per_sample_draws_are_the_same_in_any_process_and_order():
    def draw(clients, hashseed):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(Path(__file__).parents[1])}
        out = subprocess.run(
            [sys.executable, "-c", _DRAW, *map(str, clients)], capture_output=True, text=True, env=env, check=True
        ).stdout
        return json.loads(out)

    together = draw([4, 0], "1")  # client 4 (hybrid: neither) drawn first, then client 0
    assert draw([0], "2")["missing-0"] == together["missing-0"]
    alone = draw([4], "3")
    assert alone["missing-4"] == together["missing-4"] and alone["hybrid-4"] == together["hybrid-4"]


def test_scenario_tags():
    assert scenario_tag({"name": "aligned"}) == "aligned"
    assert scenario_tag({"name": "missing", "mrate": 0.3}) == "missing-mrate0.3"
    assert scenario_tag({"name": "cross", "image_clients": 3}) == "cross-img3"
    assert scenario_tag({"name": "hybrid", "qrate": 0.4}) == "hybrid-qrate0.4"


# --- eval.scenario ---------------------------------------------------------------------------


def test_eval_scenario_keeps_full_modality_by_default_and_drops_on_request():
    samples = _samples(4000)
    assert apply_eval_scenario(samples, "aligned", 0.0, 42) == samples
    assert apply_eval_scenario(samples, "aligned", 0.5, 42) == samples
    assert _mix(apply_eval_scenario(samples, "image_only", 0.0, 42))["image"] == 4000
    assert _mix(apply_eval_scenario(samples, "text_only", 0.0, 42))["text"] == 4000
    missing = apply_eval_scenario(samples, "missing", 0.3, 42)
    assert missing == apply_eval_scenario(samples, "missing", 0.3, 42)
    assert _within(_mix(missing)["both"], 4000, 0.49) and _within(_mix(missing)["none"], 4000, 0.09)
    assert samples[0]["image"] is not None  # the input is untouched
    with pytest.raises(ValueError, match="eval.scenario='blind'"):
        apply_eval_scenario(samples, "blind", 0.0, 42)


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["scenario=missing", "scenario.mrate=1.5"], "scenario.mrate=1.5 must be a number in [0, 1]"),
        (["scenario=hybrid", "scenario.qrate=-0.1"], "scenario.qrate=-0.1 must be a number in [0, 1]"),
        (
            ["scenario=cross", "scenario.image_clients=5"],
            "scenario.image_clients=5 must be an integer in [0, num_clients=4]; set scenario.image_clients<=4",
        ),
        (["scenario=nope"], "unknown scenario 'nope'; choose one of ['aligned', 'cross', 'hybrid', 'missing']"),
        (["eval.scenario=blind"], "eval.scenario='blind': choose one of aligned, missing, image_only, text_only"),
        (["eval.scenario=missing", "eval.mrate=2"], "eval.mrate=2 must be a number in [0, 1]"),
        (["partitioner=fedmllm", "partitioner.alpha=0"], "partitioner.alpha=0 must be a number > 0"),
    ],
)
def test_bad_scenario_config_names_the_key_and_the_fix(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_scenario_and_partitioner_options_compose():
    cfg = compose(
        ["partitioner=fedmllm", "scenario=cross", "num_clients=10", "clients_per_round=10", "scenario.image_clients=7"]
    )
    assert cfg["partitioner"] == {"name": "fedmllm", "alpha": 0.5, "topup": "all"}  # easy-vqa: the Hateful Memes rule
    assert cfg["scenario"] == {"name": "cross", "image_clients": 7}
    assert compose()["eval"]["scenario"] == "aligned" and compose()["seed"] == 42


# --- fedmllm partition: files, stats, chart, atomic writes, data-dir round trip ---------------


def _cfg(*extra):
    return compose(
        [
            "partitioner=fedmllm",
            "num_clients=10",
            "clients_per_round=10",
            "server_stage=none",
            "dataset.public_fraction=0",
            *extra,
        ]
    )


def test_write_partitions_layout_stats_and_chart(tmp_path):
    from fedmllm.partitioning.materialise import format_stats, write_partitions

    cfg = _cfg("scenario=missing", "scenario.mrate=0.3", "dataset.name=synthetic")
    pool = _samples(3000)
    target, stats = write_partitions(cfg, tmp_path, TASK, pool)
    assert target == tmp_path / "synthetic" / "missing-mrate0.3" / "partition-alpha0.5-clt10"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [f"client_{i}.jsonl" for i in range(10)] + ["partition.json", "stats.json", "stats.png", "task.json"]
    )
    root = json.loads((target / "partition.json").read_text())["image_root"]
    assert root == os.path.abspath("img")  # the images' common directory; the rows are relative to it
    assert json.loads((target / "stats.json").read_text()) == stats
    assert [r["client"] for r in stats] == list(range(10))
    for r, i in zip(stats, range(10)):
        rows = [json.loads(line) for line in (target / f"client_{i}.jsonl").read_text().splitlines()]
        assert set(r) == {"client", "num_samples", "labels", "modalities"}
        assert r["num_samples"] == len(rows) == sum(r["labels"].values()) == sum(r["modalities"].values())
        assert set(r["labels"]) == {"no", "yes"} and set(r["modalities"]) == {"both", "image", "text", "none"}
        assert r["labels"]["yes"] == sum(row["label"] == 1 for row in rows) >= 1
        assert all(set(row) == {"id", "image", "text", "label"} for row in rows)
        assert all(row["image"] is None or not os.path.isabs(row["image"]) for row in rows)
    assert sum(r["num_samples"] for r in stats) == 3000
    assert _within(sum(r["modalities"]["both"] for r in stats), 3000, 0.49)
    assert (target / "stats.png").read_bytes()[:4] == b"\x89PNG" and (target / "stats.png").stat().st_size > 5000
    table = format_stats(stats).splitlines()
    assert table[0].split() == ["client", "samples", "both", "image", "text", "none", "no", "yes"]
    assert table[-1].split()[:2] == ["total", "3000"] and len(table) == 2 + 10 + 1
    assert [t.name for t in target.parent.iterdir()] == [target.name]  # no temporary directories left


def test_a_crash_while_writing_leaves_no_half_partition(tmp_path, monkeypatch):
    from fedmllm.partitioning import materialise

    cfg = _cfg("dataset.name=synthetic")
    target, _ = materialise.write_partitions(cfg, tmp_path, TASK, _samples(500))
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(materialise, "plot_stats", crash)
    with pytest.raises(OSError, match="disk full"):
        materialise.write_partitions(cfg, tmp_path, TASK, _samples(700, seed=1))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old partition, untouched
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    fresh = _cfg("dataset.name=synthetic", "scenario=hybrid")
    with pytest.raises(OSError, match="disk full"):
        materialise.write_partitions(fresh, tmp_path, TASK, _samples(700))
    assert list(materialise.partition_path(fresh, tmp_path).parent.iterdir()) == []


def test_partition_of_10000_samples_keeps_every_sample(tmp_path):
    """(Its time is measured by bench/partition.py, not asserted here.)"""
    from fedmllm.partitioning.materialise import write_partitions

    pool = _samples(10_000)
    for scenario in ("scenario=missing", "scenario=cross", "scenario=hybrid"):
        _, stats = write_partitions(_cfg(scenario, "dataset.name=synthetic"), tmp_path, TASK, pool)
        assert sum(r["num_samples"] for r in stats) == 10_000


@pytest.mark.parametrize("scenario", ["scenario=aligned", "scenario=missing", "scenario=cross", "scenario=hybrid"])
def test_clients_read_the_materialised_partition_and_build_the_same_on_the_fly(tmp_path, scenario):
    from fedmllm.client.rounds import local_data
    from fedmllm.partitioning.materialise import write_partitions

    cfg = _cfg(scenario)
    target, stats = write_partitions(cfg, tmp_path)
    for i in range(10):
        _, from_file = local_data(cfg, NodeIdentity(i, 10, str(target)))
        task, on_the_fly = local_data(cfg, NodeIdentity(i, 10))
        assert from_file == on_the_fly and len(from_file) == stats[i]["num_samples"] > 0


def test_data_dir_errors_name_the_file_the_settings_and_the_command(tmp_path, monkeypatch):
    from fedmllm.partitioning.materialise import read_client, write_partitions

    monkeypatch.chdir(tmp_path)  # the samples' images are img/<i>.png: here
    (tmp_path / "img").mkdir()
    for i in range(500):
        (tmp_path / "img" / f"{i}.png").touch()
    cfg = _cfg("scenario=cross", "dataset.name=synthetic")
    target, _ = write_partitions(cfg, tmp_path, TASK, _samples(500))
    (target / "client_7.jsonl").unlink()
    with pytest.raises(
        ConfigError,
        match=r"has no client_7.jsonl; write it with `fedmllm partition <the run's "
        r"overrides> out=DIR`",
    ):
        read_client(target, cfg, 7, 10)
    other = _cfg("scenario=hybrid", "dataset.name=synthetic")
    with pytest.raises(
        ConfigError,
        match=r"partitioned with \{'scenario': \{'name': 'cross'.*but this run has "
        r"\{'scenario': \{'name': 'hybrid'.*rewrite it",
    ):
        read_client(target, other, 0, 10)
    assert len(read_client(target, cfg, 0, 10)) > 0
    (tmp_path / "img" / "7.png").unlink()
    owner = next(
        i
        for i in range(10)
        if any(json.loads(line)["image"] == "7.png" for line in (target / f"client_{i}.jsonl").read_text().splitlines())
    )
    with pytest.raises(ConfigError, match=rf"1 of the images of client_{owner}.jsonl are not under .*7.png"):
        read_client(target, cfg, owner, 10)


def test_partition_command_prints_the_table_and_writes_the_directory(tmp_path, capsys):
    from fedmllm.cli import main

    main(
        [
            "partition",
            "dataset=easyvqa",
            "scenario=missing",
            "scenario.mrate=0.3",
            "partitioner=fedmllm",
            "num_clients=10",
            f"out={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    target = tmp_path / "easyvqa" / "missing-mrate0.3" / "partition-alpha0.5-clt10"
    assert out.splitlines()[0].split() == ["client", "samples", "both", "image", "text", "none", "no", "yes"]
    assert f"partition dir: {target}" in out and (target / "stats.png").is_file()
    with pytest.raises(SystemExit):
        main(["partition", "scenario=missing"])
    assert "needs one out=DIR" in capsys.readouterr().err


# --- empty partitions ------------------------------------------------------------------------


def _skewed():
    """8 clients, Dirichlet(0.05) without a minimum size: on 60 samples clients 5 and 6 get none."""
    return compose(
        [
            "partitioner=dirichlet",
            "partitioner.alpha=0.05",
            "partitioner.min_partition_size=0",
            "num_clients=8",
            "clients_per_round=8",
        ]
    )


def test_empty_partitions_are_found_and_warned_about(capsys):
    from fedmllm.partitioning.materialise import empty_clients, warn_empty

    assert empty_clients(_skewed(), _samples(60)) == [5, 6]
    warn_empty([3, 5])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("warning: client 3's partition is empty")
    assert "lower num_clients or raise partitioner.alpha" in err[1]


def test_run_simulation_lists_empty_partitions_up_front(monkeypatch, capsys):
    import flwr.simulation

    import fedmllm.data
    from fedmllm.simulation import run_simulation

    started = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: started.append(kw))
    monkeypatch.setattr(fedmllm.data, "load_task", lambda *a: (TASK, _samples(60), []))
    run_simulation(_skewed(), ())
    assert "warning: client 5's partition is empty" in capsys.readouterr().err and len(started) == 1


def test_an_empty_client_replies_its_adapter_unchanged_with_zero_examples(tiny_cfg, monkeypatch):
    import fedmllm.client.rounds as client
    from fedmllm.models import get_model
    from fedmllm.models.adapter import adapter_state
    from fedmllm.stages.cache import model_config
    from fedmllm.strategies.aggregate import InvalidReply, check_reply

    monkeypatch.setattr(client, "local_data", lambda cfg, ident: (TASK, []))
    arrays = {k: v + 0.5 for k, v in adapter_state(get_model(model_config(tiny_cfg), tiny_cfg["peft"]).model).items()}
    out, metrics, extra = client.train_round(tiny_cfg, NodeIdentity(1, 2), arrays, server_round=1)
    assert extra == {}
    assert out.keys() == arrays.keys() and all(np.array_equal(out[k], arrays[k]) for k in arrays)
    assert metrics["num-examples"] == 0 and metrics["empty-partition"] == 1 and metrics["partition-size"] == 0
    assert math.isnan(metrics["train-loss"])
    with pytest.raises(
        InvalidReply, match="num-examples=0 must be a finite number > 0"
    ):  # the strategy drops it with this reason
        check_reply(arrays, out, metrics["num-examples"])


@pytest.mark.slow
def test_one_cell_of_the_offline_grid_runs_on_the_tiny_model(tmp_path):
    """A cell of bench/offline_grid.sh (the flag task, missing modalities, the server's stages)
    on tiny-llava: every round aggregated, the held-out set scored with and without the image,
    and per-modality training data as the scenario says."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_overrides
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    run = run_in_process(
        tiny_overrides(
            "+experiment=offline_grid",
            "+cell=missing",
            "num_clients=2",
            "clients_per_round=2",
            "num_rounds=2",
            "eval_every=2",
            "train.local_steps=2",
            "dataset.eval_samples=16",
            f"out_dir={tmp_path}",
        )
    )
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1].get("accuracy") is None and 0 <= rows[2]["accuracy"] <= 1  # eval_every=2
    assert {"accuracy_no_image", "auroc"} <= set(rows[2])
    assert all(len(r["clients"]) == 2 and all("dropped" not in c for c in r["clients"]) for r in rows[1:])
    assert (run / "stage1.json").is_file() and (run / "stage1_adapter.json").is_file()


def test_a_site_with_its_partition_folder_needs_nothing_else_of_the_dataset(tmp_path, monkeypatch):
    """`fedmllm partition` writes image paths relative to the images' folder and the task beside
    them: a SuperNode given the partition folder (data-dir) and where its images are (image-root)
    trains on the same samples with the dataset itself moved away, and never loads it."""
    import shutil

    import fedmllm.data
    from fedmllm.client.rounds import local_data
    from fedmllm.config import node_identity
    from fedmllm.data.fixtures import write_hateful_memes
    from fedmllm.partitioning.materialise import write_partitions

    root = write_hateful_memes(tmp_path / "hm", n_rows=40, seed=2)
    cfg = compose(
        [
            "dataset=hateful_memes",
            f"dataset.root={root}",
            "num_clients=2",
            "clients_per_round=2",
            "partitioner=iid",
            "scenario=missing",
            "scenario.mrate=0.3",
            "dataset.eval_samples=4",
        ]
    )
    target, _ = write_partitions(cfg, tmp_path / "parts")
    want = [local_data(cfg, node_identity({"partition-id": i, "num-partitions": 2})) for i in range(2)]

    site = tmp_path / "site"  # what one site holds: its partition folder and the images
    shutil.copytree(target, site / "partition")
    shutil.copytree(root / "img", site / "images")
    shutil.move(str(root), str(tmp_path / "moved-away"))
    monkeypatch.setattr(fedmllm.data, "load_task", lambda *a, **k: pytest.fail("the dataset was loaded"))
    for i in range(2):
        ident = node_identity(
            {
                "partition-id": i,
                "num-partitions": 2,
                "data-dir": str(site / "partition"),
                "image-root": str(site / "images"),
            }
        )
        task, samples = local_data(cfg, ident)
        assert task == want[i][0]
        assert [s["id"] for s in samples] == [s["id"] for s in want[i][1]] and samples
        assert all(
            s["image"] is None or s["image"].startswith(str(site / "images")) and os.path.isfile(s["image"])
            for s in samples
        )
        assert [s["image"] is None for s in samples] == [s["image"] is None for s in want[i][1]]

    # without image-root the images are looked for where they were, and the error says what to set
    with pytest.raises(ConfigError, match=r"images of client_0.jsonl are not under .*set node_config image-root"):
        local_data(cfg, node_identity({"partition-id": 0, "num-partitions": 2, "data-dir": str(site / "partition")}))
    with pytest.raises(ConfigError, match=r"image-root=.* is read with data-dir only"):
        node_identity({"partition-id": 0, "num-partitions": 2, "image-root": str(site / "images")})
