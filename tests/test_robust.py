"""Robust aggregation (fedmedian, fedtrimmedavg, krum, multikrum, bulyan: Flower's strategies over
the adapter) against Byzantine clients (faults.byzantine), and the attacks themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from fedmllm.faults import FaultSettings, byzantine

ROBUST = ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]
# replies each needs with one Byzantine client (Krum: n > 2f + 2; Bulyan: n >= 4f + 3)
CLIENTS = {"bulyan": 7}


def test_each_attack_replaces_the_update_as_documented():
    rng = np.random.default_rng(0)
    sent = {"a": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32)}
    trained = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in sent.items()}
    update = {k: trained[k] - sent[k] for k in sent}
    scaled = byzantine(trained, sent, FaultSettings(byzantine=1, attack="scale", scale=10.0), seed=1)
    flipped = byzantine(trained, sent, FaultSettings(byzantine=1, attack="sign_flip", scale=3.0), seed=1)
    noise = byzantine(trained, sent, FaultSettings(byzantine=1, attack="random"), seed=1)
    for k in sent:
        np.testing.assert_allclose(scaled[k] - sent[k], 10 * update[k], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(flipped[k] - sent[k], -3 * update[k], rtol=1e-4, atol=1e-6)
        random_update = noise[k] - sent[k]
        assert np.linalg.norm(random_update) == pytest.approx(np.linalg.norm(update[k]), rel=1e-4)
        cos = float(random_update.ravel() @ update[k].ravel()) / (
            np.linalg.norm(random_update) * np.linalg.norm(update[k])
        )
        assert abs(cos) < 0.9  # a direction of its own
    again = byzantine(trained, sent, FaultSettings(byzantine=1, attack="random"), seed=1)
    assert all(np.array_equal(noise[k], again[k]) for k in sent)  # seeded
    assert FaultSettings(byzantine=2).attacks(1) and not FaultSettings(byzantine=2).attacks(2)


def test_settings_name_what_a_robust_aggregator_needs():
    from fedmllm.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"aggregator=bulyan with num_malicious_nodes=1 needs n >= 4f \+ 3"):
        compose(["aggregator=bulyan", "num_clients=5", "clients_per_round=5"])
    with pytest.raises(ConfigError, match="faults.attack='flip': choose scale, sign_flip or random"):
        compose(["faults.attack=flip"])
    with pytest.raises(ConfigError, match="faults.byzantine=9 exceeds num_clients=4"):
        compose(["faults.byzantine=9"])


def _global(run: Path) -> dict[str, np.ndarray]:
    from fedmllm.server.checkpoint import read_state_flat

    state = read_state_flat(run / "checkpoints" / "round-1" / "fedmllm-state.npz")
    return {k: v for k, v in state.items() if k.startswith("global/")}


def _run(tmp_path: Path, name: str, aggregator: str, *extra: str) -> dict[str, np.ndarray]:
    from inprocess import run_in_process

    n = CLIENTS.get(aggregator, 5)
    out = tmp_path / name
    run_in_process(
        tiny_overrides(
            f"aggregator={aggregator}",
            f"num_clients={n}",
            f"clients_per_round={n}",
            "partitioner=iid",
            "num_rounds=1",
            "train.local_steps=1",
            "server_stage=none",
            "dataset.eval_samples=4",
            f"out_dir={out}",
            *extra,
        )
    )
    return _global(out)


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))


@pytest.mark.slow
def test_one_scaled_client_moves_fedavg_far_and_each_robust_aggregator_little(tmp_path):
    """One client of five (seven for Bulyan) sends its update x1000: FedAvg's global adapter
    lands far from the honest FedAvg round's, each robust aggregator's stays within a small
    multiple of an honest update of it."""
    attack = ["faults.byzantine=1", "faults.attack=scale", "faults.scale=1000"]
    for n in sorted({5, *CLIENTS.values()}):
        honest = _run(tmp_path, f"honest{n}", "fedavg", f"num_clients={n}", f"clients_per_round={n}")
        attacked = _run(tmp_path, f"attacked{n}", "fedavg", f"num_clients={n}", f"clients_per_round={n}", *attack)
        far = _distance(attacked, honest)
        for aggregator in [a for a in ROBUST if CLIENTS.get(a, 5) == n]:
            robust = _run(tmp_path, aggregator, aggregator, *attack)
            near = _distance(robust, honest)
            assert near < 0.05 * far, (aggregator, near, far)
        assert far > 0
