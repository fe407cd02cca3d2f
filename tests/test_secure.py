"""Secure aggregation (secure_aggregation=true: Flower's SecAgg+ workflow and client mod, bridged
to the run's strategy by fedmllm.strategies.secure): the server gets only the clients' mean, which
equals plain equal-weight FedAvg within SecAgg+'s quantization; what it cannot work with is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmllm.config import ConfigError, compose


def _global(run: Path, server_round: int) -> dict[str, np.ndarray]:
    from fedmllm.server.checkpoint import read_state_flat

    state = read_state_flat(run / "checkpoints" / f"round-{server_round}" / "fedmllm-state.npz")
    return {k: v for k, v in state.items() if k.startswith("global/")}


def test_settings_refuse_what_needs_each_reply():
    secure = ["secure_aggregation=true"]
    for extra, why in [
        (["aggregator=krum", "num_clients=5", "clients_per_round=5"], "statistic of the individual replies"),
        (["aggregator=scaffold"], "control-variate corrections"),
        (["aggregator=flora"], "stacks each client's own LoRA factors"),
        (["aggregator=local"], "trains one partition alone"),
        (["+aggregator.max_update_norm=5"], "max_update_norm: the server never sees one client's update"),
        (["privacy=dp_server_fixed", "privacy.noise_multiplier=1"], "can neither clip each update"),
        (["transport=int8"], "secure_aggregation with transport"),
        (["clients_per_round=1"], "needs clients_per_round >= 2"),
    ]:
        with pytest.raises(ConfigError, match=why):
            compose([*secure, *extra])
    for aggregator in ("fedavg", "fedprox", "fedadam", "ffa_lora", "fedsa_lora"):
        assert compose([*secure, f"aggregator={aggregator}"])["secure_aggregation"] is True
    with pytest.raises(ConfigError, match="secagg.quantization_range"):
        compose([*secure, "secagg.quantization_range=1"])


@pytest.mark.slow
def test_secure_mean_equals_plain_equal_weight_fedavg_within_quantization(tmp_path):
    """The same 3 clients with and without SecAgg+: round 1's global adapter (the same start, the
    same client updates) agrees in every entry within a few quantization steps (one step:
    2 x clipping_range / quantization_range = 3.8e-6; each client's values are rounded
    stochastically). Round 2 starts from those slightly different adapters, which training then
    amplifies (4e-5 measured), so it is only checked to stay close."""
    from inprocess import three_client_rows

    plain = three_client_rows(tmp_path / "plain", "train.local_steps=1", "train.weight_by=examples_seen")
    secure = three_client_rows(tmp_path / "secure", "train.local_steps=1", "secure_aggregation=true")
    assert [r["round"] for r in secure] == [0, 1, 2]
    assert [c["partition-id"] for c in secure[1]["clients"]] == [0, 1, 2]  # each client's metrics still arrive
    step = 2 * 8.0 / 4194304
    start = _global(tmp_path / "plain", 0)
    a, b = _global(tmp_path / "plain", 1), _global(tmp_path / "secure", 1)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 4 * step
    assert max(float(np.abs(a[k] - start[k]).max()) for k in a) > 100 * step  # training moved it far more
    a2, b2 = _global(tmp_path / "plain", 2), _global(tmp_path / "secure", 2)
    assert max(float(np.abs(a2[k] - b2[k]).max()) for k in a2) <= 1e-3
    assert secure[2]["train_loss"] == pytest.approx(plain[2]["train_loss"], rel=1e-3)


@pytest.mark.slow
def test_secure_aggregation_with_client_side_dp_noises_for_the_clients_in_the_sum(tmp_path):
    from inprocess import three_client_rows

    rows = three_client_rows(
        tmp_path / "run",
        "train.local_steps=1",
        "secure_aggregation=true",
        "privacy=dp_client_fixed",
        "privacy.noise_multiplier=1.0",
        "privacy.clipping_norm=0.001",
    )
    for r in rows[1:]:
        assert r["dp_noise_std"] == pytest.approx(1.0 * 0.001 / 3)  # three clients in the mean, not one reply
        assert r["dp_update_norm_max"] <= 0.001 * (1 + 1e-3) + 4 * 2 * 8.0 / 4194304  # clipped on each client
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"]


def test_server_app_grid_pulls_replies_every_half_second_and_keeps_the_timeout(monkeypatch):
    """Flower's deployment grid sleeps 3 s between pulls; SecAgg+'s four stages a round would pay it
    four times. The ServerApp's PollingGrid pulls at PULL_INTERVAL, returns every reply, and stops
    at the timeout with what arrived."""
    from types import SimpleNamespace

    import fedmllm.server.app as server_app

    class Fake:
        def __init__(self, ready_after: int):
            self.pulls, self.ready_after = 0, ready_after

        def push_messages(self, messages):
            return [f"id-{m.name}" for m in messages]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.pulls < self.ready_after:
                return []
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)[:1]]

    clock = {"t": 0.0}
    sleeps: list[float] = []

    def sleep(s):
        sleeps.append(s)
        clock["t"] += s

    monkeypatch.setattr(server_app.time, "sleep", sleep)
    monkeypatch.setattr(server_app.time, "monotonic", lambda: clock["t"])

    def msg(name):
        return SimpleNamespace(name=name, metadata=SimpleNamespace(message_type="train"))

    fake = Fake(ready_after=3)  # nothing for two pulls, then one reply a pull
    replies = server_app.PollingGrid(fake).send_and_receive([msg("a"), msg("b")], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-a", "id-b"]
    assert fake.pulls == 4 and sleeps == [server_app.PULL_INTERVAL] * 3 and server_app.PULL_INTERVAL < 3
    sleeps.clear()
    slow = Fake(ready_after=10**6)  # never answers: the timeout ends the wait, nothing returned
    assert list(server_app.PollingGrid(slow, interval=0.5).send_and_receive([msg("a")], timeout=1.2)) == []
    assert sum(sleeps) == pytest.approx(1.2) and slow.pulls == 4
