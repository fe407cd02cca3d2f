"""Client-side evaluation (eval.client_fraction: Flower's @app.evaluate on each client's own
held-out split) and FedSA-LoRA's personal models (the global A + the client's own B, which never
leaves the client), and `fedmllm report`'s global vs personalized table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmllm.client.rounds import hold_out
from fedmllm.config import ConfigError, compose


def test_hold_out_is_seeded_disjoint_and_keeps_training_data():
    samples = [{"id": i} for i in range(50)]
    train, test = hold_out(samples, 0.2, seed=42, partition_id=3)
    assert len(test) == 10 and len(train) == 40
    assert {s["id"] for s in train}.isdisjoint({s["id"] for s in test})
    assert hold_out(samples, 0.2, seed=42, partition_id=3) == (train, test)  # the same every round
    assert hold_out(samples, 0.2, seed=42, partition_id=4)[1] != test  # another client, another draw
    assert hold_out(samples, 0.0, 42, 3) == (samples, [])
    assert hold_out(samples[:1], 0.5, 42, 3) == (samples[:1], [])  # one sample stays for training
    assert len(hold_out(samples[:3], 0.01, 42, 3)[1]) == 1  # at least one held out
    assert len(hold_out(samples[:3], 0.99, 42, 3)[0]) == 1  # never all


def test_settings_refuse_a_bad_fraction_and_flora():
    with pytest.raises(ConfigError, match="eval.client_fraction=1 must be in"):
        compose(["eval.client_fraction=1"])
    with pytest.raises(ConfigError, match="eval.client_fraction: aggregator=flora"):
        compose(["eval.client_fraction=0.2", "aggregator=flora"])


def _run(tmp_path: Path, *extra: str) -> tuple[Path, list[dict]]:
    from inprocess import three_client_rows

    out = tmp_path / "run"
    return out, three_client_rows(out, "train.local_steps=2", "eval.client_fraction=0.05", *extra)


@pytest.mark.slow
def test_fedsa_clients_evaluate_their_personal_model_and_never_send_b(tmp_path):
    out, rows = _run(tmp_path, "aggregator=fedsa_lora")
    assert "client_eval" not in rows[0]  # round 0: the server's evaluation only
    for row in rows[1:]:
        evals = row["client_eval"]
        assert [e["partition-id"] for e in evals] == [0, 1, 2]
        assert all(e["num-examples"] > 0 and 0 <= e["accuracy"] <= 1 for e in evals)
        acc = [e["accuracy"] for e in evals]
        assert row["client_accuracy_mean"] == pytest.approx(np.mean(acc))
        assert row["client_accuracy_std"] == pytest.approx(np.std(acc))
        assert row["client_accuracy_min"] == min(acc)
        assert evals[acc.index(min(acc))]["partition-id"] == row["client_accuracy_worst"]
        # B stays on the client: every upload is the size of what was sent down (A and the projector)
        assert set(row["bytes_up_per_client"].values()) == {row["bytes_down"] // 3}
        assert all(c["bytes"] == row["bytes_down"] // 3 for c in row["clients"])
    # each client saved its personal adapter in PEFT format: its own B, differing across clients
    b_sums = []
    for pid in range(3):
        personal = out / "client-state" / f"partition-{pid}-personal"
        assert json.loads((personal / "adapter_config.json").read_text())["peft_type"] == "LORA"
        weights = load_file(personal / "adapter_model.safetensors")
        b = sum(float(np.abs(v).sum()) for k, v in weights.items() if "lora_B" in k)
        with np.load(out / "client-state" / f"partition-{pid}-round-2.npz") as state:
            kept = sum(float(np.abs(state[k]).sum()) for k in state.files if k.startswith("lora_b/"))
        assert b == pytest.approx(kept, rel=1e-6) and b > 0
        b_sums.append(b)
    assert len(set(b_sums)) == 3


@pytest.mark.slow
def test_fedavg_clients_evaluate_the_global_model_on_their_own_split(tmp_path):
    out, rows = _run(tmp_path, "aggregator=fedavg", "num_rounds=3", "eval_every=2")
    assert [("client_eval" in r) for r in rows] == [False, False, True, True]  # every 2nd round and the last
    assert not list((out / "client-state").glob("*-personal"))  # nothing personal to save
