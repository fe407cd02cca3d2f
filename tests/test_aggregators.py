"""Every aggregator end to end (real server + client code, in-process grid), SCAFFOLD's math on a
synthetic heterogeneous problem, LoRA-aware aggregation, and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmllm.strategies.aggregate import (
    flora_merge,
    flora_stack,
    low_rank_factors,
    scaffold_client_variate,
    scaffold_server_update,
    weighted_average,
)

AGGREGATORS = sorted(p.stem for p in (Path(__file__).parents[1] / "fedmllm/conf/aggregator").glob("*.yaml"))


# what an aggregator needs beyond the tiny run's two clients
EXTRA = {
    "flora": ["aggregator.client.ranks=[4,8]", "aggregator.client.max_rank=16"],
    # n > 2f + 2 and n >= 4f + 3 clients; one local step each keeps the extra clients cheap
    "krum": ["num_clients=5", "clients_per_round=5", "partitioner=iid", "train.local_steps=1"],
    "multikrum": ["num_clients=5", "clients_per_round=5", "partitioner=iid", "train.local_steps=1"],
    "bulyan": ["num_clients=7", "clients_per_round=7", "partitioner=iid", "train.local_steps=1"],
}


def _state(run_dir: Path, rnd: int) -> dict[str, np.ndarray]:
    from fedmllm.server.checkpoint import read_state_flat

    return read_state_flat(run_dir / "checkpoints" / f"round-{rnd}" / "fedmllm-state.npz")


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    from inprocess import run_in_process

    out = tmp_path / name
    run_in_process(
        tiny_overrides("num_rounds=3", "server_stage=none", "dataset.eval_samples=8", f"out_dir={out}", *extra)
    )
    return out


# --- end to end: every aggregator, 3 rounds -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_every_aggregator_runs_three_rounds(tmp_path, aggregator):
    from fedmllm.tracking import read_metrics

    extra = EXTRA.get(aggregator, [])
    run = _run(tmp_path, aggregator, f"aggregator={aggregator}", *extra)
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(np.isfinite(r["train_loss"]) for r in rows[1:])
    first, last = _state(run, 0), _state(run, 3)
    shared = [k for k in last if k.startswith("global/")]
    assert shared == [k for k in first if k.startswith("global/")]
    moved = max(float(np.abs(first[k] - last[k]).max()) for k in first if k.startswith("global/"))
    assert moved > 0, "the global adapter never changed"
    assert (run / "checkpoints/round-3/adapter_model.safetensors").is_file()
    # what travels, per aggregator
    has_a = any(".lora_A." in k for k in shared)
    has_b = any(".lora_B." in k for k in shared)
    assert (has_a, has_b) == {"ffa_lora": (False, True), "fedsa_lora": (True, False)}.get(aggregator, (True, True))
    ups = rows[3]["bytes_up_per_client"]
    if aggregator == "flora":
        assert ups["0"] < ups["1"]  # rank 4 vs rank 8
        assert rows[3]["bytes_down"] / 2 > ups["1"]  # the global update has rank 16
        assert rows[1]["flora_truncation_error"] == pytest.approx(0.0, abs=1e-5)  # rank 4 + 8 <= 16: exact
        assert 0 <= rows[3]["flora_truncation_error"] < 1  # 3 rounds x 12 > 16: truncated, and logged
    if aggregator == "scaffold":
        assert any(k.startswith("state/server_c/") and np.abs(v).max() > 0 for k, v in last.items())
        assert (run / "client-state/partition-0-round-3.npz").is_file()


# --- SCAFFOLD ---------------------------------------------------------------------------------


def _quadratic_clients(seed=0, n=4, dim=5):
    """f_k(x) = 0.5 ||M_k x - b_k||^2 with very different M_k, b_k (heterogeneous clients)."""
    rng = np.random.default_rng(seed)
    ms = [np.diag(rng.uniform(0.2, 3.0, dim)) for _ in range(n)]
    bs = [rng.normal(0, 3, dim) for _ in range(n)]
    h = sum(m.T @ m for m in ms)
    x_star = np.linalg.solve(h, sum(m.T @ b for m, b in zip(ms, bs)))
    return ms, bs, x_star


def _federate(scaffold: bool, rounds=60, steps=10, lr=0.1):
    ms, bs, x_star = _quadratic_clients()
    n = len(ms)
    x = {"w": np.zeros(5, np.float32)}
    c = {"w": np.zeros(5, np.float32)}
    c_k = [{"w": np.zeros(5, np.float32)} for _ in range(n)]
    drift = []
    for _ in range(rounds):
        dys, dcs, ys = [], [], []
        for k in range(n):
            y = x["w"].astype(np.float64).copy()
            gsum = np.zeros(5)
            for _ in range(steps):
                g = ms[k].T @ (ms[k] @ y - bs[k])
                gsum += g
                corr = (c["w"] - c_k[k]["w"]) if scaffold else 0.0
                y -= lr * (g + corr)
            new_c = scaffold_client_variate({"w": gsum}, steps)
            dcs.append({"w": new_c["w"] - c_k[k]["w"]})
            c_k[k] = new_c
            dys.append({"w": (y - x["w"]).astype(np.float32)})
            ys.append(y)
        drift.append(float(np.mean([np.linalg.norm(y - np.mean(ys, 0)) for y in ys])))
        if scaffold:
            x, c = scaffold_server_update(x, c, dys, dcs, [1.0] * n, n)
        else:
            x = {"w": (x["w"] + weighted_average(dys, [1.0] * n)["w"]).astype(np.float32)}
    return x["w"], x_star, drift


def test_scaffold_differs_from_fedavg_and_reduces_client_drift():
    x_avg, x_star, drift_avg = _federate(scaffold=False)
    x_sc, _, drift_sc = _federate(scaffold=True)
    err_avg, err_sc = np.linalg.norm(x_avg - x_star), np.linalg.norm(x_sc - x_star)
    assert np.linalg.norm(x_avg - x_sc) > 0.1  # not FedAvg in disguise
    assert err_sc < 0.05 * err_avg  # FedAvg stalls at a biased point with many local steps; SCAFFOLD does not
    assert np.mean(drift_sc[-10:]) < 0.5 * np.mean(drift_avg[-10:])  # clients stay together


def test_scaffold_server_update_by_hand():
    x, c = {"w": np.array([1.0, 1.0], np.float32)}, {"w": np.zeros(2, np.float32)}
    new_x, new_c = scaffold_server_update(
        x,
        c,
        [{"w": np.array([2.0, 0.0])}, {"w": np.array([0.0, 4.0])}],
        [{"w": np.array([1.0, 1.0])}, {"w": np.array([3.0, 3.0])}],
        [1, 3],
        num_clients=4,
    )
    # x + (1*[2,0] + 3*[0,4]) / 4 = [1.5, 4];  c + (2/4) * mean([1,1],[3,3]) = [1, 1]
    np.testing.assert_allclose(new_x["w"], [1.5, 4.0])
    np.testing.assert_allclose(new_c["w"], [1.0, 1.0])


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.integers(1, 20)), min_size=1, max_size=5),
    st.randoms(use_true_random=False),
)
def test_scaffold_update_is_permutation_invariant(items, rnd):
    x, c = {"w": np.ones(3, np.float32)}, {"w": np.zeros(3, np.float32)}
    dy = [{"w": np.full(3, a, np.float32)} for a, _, _ in items]
    dc = [{"w": np.full(3, b, np.float32)} for _, b, _ in items]
    w = [n for _, _, n in items]
    order = list(range(len(items)))
    rnd.shuffle(order)
    base = scaffold_server_update(x, c, dy, dc, w, 10)
    perm = scaffold_server_update(x, c, [dy[i] for i in order], [dc[i] for i in order], [w[i] for i in order], 10)
    for a, b in zip(base, perm):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-5)


# --- LoRA-aware --------------------------------------------------------------------------------


def _lora(rng, rank, out=6, inp=5):
    return {
        "m.lora_A.weight": rng.normal(size=(rank, inp)).astype(np.float32),
        "m.lora_B.weight": rng.normal(size=(out, rank)).astype(np.float32),
        "proj.weight": rng.normal(size=(3,)).astype(np.float32),
    }


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 30)), min_size=1, max_size=4), st.integers(0, 10_000))
def test_flora_stack_is_exact_for_any_ranks(clients, seed):
    rng = np.random.default_rng(seed)
    payloads = [_lora(rng, r) for r, _ in clients]
    weights = [n for _, n in clients]
    stacked = flora_stack(payloads, weights)
    p = np.asarray(weights, float) / sum(weights)
    want = sum(pk * x["m.lora_B.weight"].astype(float) @ x["m.lora_A.weight"] for pk, x in zip(p, payloads))
    np.testing.assert_allclose(stacked["m.lora_B.weight"] @ stacked["m.lora_A.weight"], want, rtol=1e-4, atol=1e-4)
    assert stacked["m.lora_A.weight"].shape[0] == sum(r for r, _ in clients)
    np.testing.assert_allclose(
        stacked["proj.weight"],
        weighted_average([{"k": x["proj.weight"]} for x in payloads], weights)["k"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_flora_merge_keeps_rank_bounded_and_exact_while_it_fits():
    rng = np.random.default_rng(0)
    glob = {k: v * 0 for k, v in _lora(rng, 4).items()}
    stacked = flora_stack([_lora(rng, 2), _lora(rng, 1)], [1, 1])
    merged, err = flora_merge(glob, stacked, max_rank=4)
    assert merged["m.lora_A.weight"].shape == (4, 5) and merged["m.lora_B.weight"].shape == (6, 4)
    np.testing.assert_allclose(
        merged["m.lora_B.weight"] @ merged["m.lora_A.weight"],
        stacked["m.lora_B.weight"] @ stacked["m.lora_A.weight"],
        atol=1e-4,
    )
    assert err == pytest.approx(0.0, abs=1e-6)
    _, err = flora_merge(merged, flora_stack([_lora(rng, 5)], [1]), max_rank=4)
    assert 0 < err < 1  # rank 3 + 5 > 4: truncated, and the error says by how much


def test_low_rank_factors_pad_to_the_requested_rank():
    b, a, err = low_rank_factors(np.outer(np.arange(3.0), np.ones(4)), 3)
    assert b.shape == (3, 3) and a.shape == (3, 4) and err == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(b @ a, np.outer(np.arange(3.0), np.ones(4)), atol=1e-5)


def test_check_reply_free_rank_accepts_other_ranks_only_for_lora():
    from fedmllm.strategies.aggregate import InvalidReply, check_reply

    rng = np.random.default_rng(0)
    ref = _lora(rng, 4)
    check_reply(ref, _lora(rng, 2), 5, free_rank=True)
    with pytest.raises(InvalidReply, match="shape"):
        check_reply(ref, _lora(rng, 2), 5)
    bad = _lora(rng, 2)
    bad["m.lora_B.weight"] = rng.normal(size=(6, 3)).astype(np.float32)
    with pytest.raises(InvalidReply, match="rank"):
        check_reply(ref, bad, 5, free_rank=True)


def test_heterogeneous_ranks_need_flora():
    from fedmllm.algorithms import algorithm_of
    from fedmllm.config import compose

    cfg = compose(tiny_overrides())
    with pytest.raises(ValueError, match="aggregator=flora"):
        algorithm_of(cfg).client_peft(cfg, 0, cfg["peft"]["r"] * 2)
    flora = compose(tiny_overrides("aggregator=flora", "aggregator.client.max_rank=32"))
    peft = algorithm_of(flora).client_peft(flora, 0, 8)
    assert peft["r"] == 40 and peft["alpha"] / peft["r"] == pytest.approx(cfg["peft"]["alpha"] / cfg["peft"]["r"])


# --- resume ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["fedadam", "scaffold", "fedavgm", "fedsa_lora"])
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, aggregator):
    """fedadam: the server's Adam moments must be restored; scaffold: c and every client's c_k; fedavgm:
    the momentum; fedsa_lora: every client's own B."""
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    common = tiny_overrides("server_stage=none", "dataset.eval_samples=8", f"aggregator={aggregator}")
    full, part = tmp_path / "full", tmp_path / "part"
    run_in_process([*common, "num_rounds=4", f"out_dir={full}"])
    run_in_process([*common, "num_rounds=2", f"out_dir={part}"])
    run_in_process([*common, "num_rounds=4", f"out_dir={part}", f"resume={part}"])
    a, b = _state(full, 4), _state(part, 4)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert [r["round"] for r in read_metrics(part)] == [0, 1, 2, 3, 4]


def test_adaptive_reg_covers_only_the_middle_llm_layers(tiny_lm):
    from fedmllm.algorithms import algorithm_class
    from fedmllm.client.local import ClientStore, LocalRound
    from fedmllm.models.adapter import adapter_state, llm_layer_index

    lm, cfg = tiny_lm
    arrays = adapter_state(lm.model)
    n = lm.model.config.get_text_config().num_hidden_layers  # 2
    for s_layer, layers in [(0, {0, 1}), (1, set())]:
        local = LocalRound(
            algorithm_class("fedavg")(),
            lm.model,
            arrays,
            {},
            ClientStore(),
            0,
            0,
            adaptive_reg={"mu": 0.01, "mu_w": 0.1, "s_layer": s_layer},
            num_llm_layers=n,
        )
        local.prepare()
        assert {llm_layer_index(k) for k in local.regularized_keys()} == layers
        assert local.has_penalty == bool(layers)
    local = LocalRound(
        algorithm_class("fedavg")(),
        lm.model,
        arrays,
        {},
        ClientStore(),
        0,
        0,
        adaptive_reg={"mu": 0.01, "mu_w": 0.1, "s_layer": 0},
        num_llm_layers=n,
    )
    local.prepare()
    import torch

    with torch.no_grad():
        key = local.regularized_keys()[0]
        local.trainable[key].add_(1.0)
    # (mu/2) mu_w ||1||^2 over that one tensor
    assert float(local.penalty()) == pytest.approx(0.01 / 2 * 0.1 * local.trainable[key].numel(), rel=1e-4)
    from fedmllm.models.adapter import load_adapter_state

    load_adapter_state(lm.model, arrays)  # the fixture's model is shared: leave it as it was


def test_resume_composes_the_stopped_runs_overrides_then_the_new_ones(tmp_path):
    from fedmllm.cli import resume_overrides
    from fedmllm.server.checkpoint import latest_state

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/overrides.yaml").write_text("- model=tiny-llava\n- num_rounds=2\n- out_dir=/elsewhere\n")
    got = resume_overrides(str(tmp_path), (f"resume={tmp_path}", "num_rounds=4", "out_dir=/x"))
    assert got == ("model=tiny-llava", "num_rounds=2", f"resume={tmp_path}", "num_rounds=4")  # last wins in Hydra
    with pytest.raises(FileNotFoundError, match="no checkpoints/round-<N>/fedmllm-state.npz"):
        latest_state(tmp_path)


def test_resuming_a_finished_run_says_how_to_continue_it(tmp_path):
    from inprocess import run_in_process

    common = tiny_overrides("server_stage=none", "dataset.eval_samples=4", "num_rounds=1", f"out_dir={tmp_path}")
    run_in_process(common)
    with pytest.raises(ValueError, match="raise num_rounds"):
        run_in_process([*common, f"resume={tmp_path}"])


def test_flora_takes_the_client_rank_from_node_config(tmp_path):
    """Deployment path: each SuperNode's --node-config "lora-rank=4" sets its LoRA rank."""
    from inprocess import InProcessGrid, task_identity

    from fedmllm.config import compose
    from fedmllm.server.run import run_server
    from fedmllm.tracking import read_metrics

    overrides = tiny_overrides(
        "server_stage=none",
        "dataset.eval_samples=4",
        "num_rounds=1",
        "aggregator=flora",
        "aggregator.client.max_rank=8",
        f"out_dir={tmp_path}",
    )
    cfg = compose(overrides)
    with task_identity():
        run_server(InProcessGrid(2, tuple(overrides), node_config={"lora-rank": 4}), cfg)
    rows = read_metrics(tmp_path)
    full = _state(tmp_path, 1)
    a_key = next(k for k in full if ".lora_A." in k)
    assert full[a_key].shape[0] == 8  # the global update keeps max_rank
    # each client sent rank-4 factors: half the LoRA bytes of a rank-8 reply
    assert rows[1]["bytes_up_per_client"]["0"] < rows[1]["bytes_down"] / 2


# --- baselines --------------------------------------------------------------------------------


def test_local_baseline_trains_one_client_alone_and_centralized_pools_every_partition(tmp_path):
    """aggregator=local (FedMLLM's local{k}): only partition k trains, every round, from its own
    adapter; the others sit out once. aggregator=centralized: one trainer on the union of all
    partitions, the federation's step count per round."""
    from fedmllm.config import compose
    from fedmllm.data import load_task
    from fedmllm.partitioning import client_partition
    from fedmllm.tracking import read_metrics

    run = _run(tmp_path, "local", "aggregator=local", "aggregator.client.only=1")
    rows = read_metrics(run)
    first = {r["partition-id"]: r for r in rows[1]["clients"]}
    assert first[0]["dropped"] == "empty partition" and first[0]["num-examples"] == 0
    assert "dropped" not in first[1] and first[1]["num-examples"] > 0
    assert all([c["partition-id"] for c in r["clients"]] == [1] for r in rows[2:])  # never asked again
    assert all(np.isfinite(r["train_loss"]) for r in rows[1:])

    cfg = compose(tiny_overrides("aggregator=centralized"))
    _, pool, _ = load_task(cfg["dataset"], cfg["seed"], cfg.get("prompt"))
    total = sum(len(client_partition(pool, cfg, i, cfg["num_clients"])) for i in range(cfg["num_clients"]))
    run = _run(tmp_path, "central", "aggregator=centralized")
    rows = read_metrics(run)
    trained = [c for r in rows[1:] for c in r["clients"] if "dropped" not in c]
    assert [c["partition-id"] for c in trained] == [0, 0, 0]
    assert all(c["num-examples"] == total for c in trained)
    with pytest.raises(Exception, match=r"aggregator.client.only=5 must be a partition id in 0..1"):
        compose(tiny_overrides("aggregator=local", "aggregator.client.only=5"))
