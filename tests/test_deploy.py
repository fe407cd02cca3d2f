"""Deployment: a real SuperLink and SuperNodes on 127.0.0.1 (scripts/deploy.sh), tiny-llava."""

from __future__ import annotations

import pytest

from conftest import tiny_overrides
from deployment import Deployment
from fedmllm.tracking import read_metrics

pytestmark = pytest.mark.slow


def overrides(out_dir, *extra: str) -> str:
    """tiny-llava, 2 clients, 1 local step; no server stage (it costs a minute and is not deployment)."""
    return " ".join(tiny_overrides("train.local_steps=1", "dataset.eval_samples=8", "server_stage=none",
                                   f"out_dir={out_dir}", *extra))


def adapter_bytes_and_keys() -> tuple[int, set[str]]:
    """What one client must send: the tiny model's trainable adapter (bytes as fp32, PEFT keys)."""
    from fedmllm.config import compose
    from fedmllm.models import clear_cache, get_model
    from fedmllm.models.adapter import adapter_state_keys, trainable_bytes

    cfg = compose(tiny_overrides("server_stage=none"))
    model = get_model(cfg["model"], cfg["peft"]).model
    out = trainable_bytes(model), set(adapter_state_keys(model))
    clear_cache()
    return out


def test_two_supernodes_run_two_rounds_exchanging_adapters_only(tmp_path):
    from safetensors import safe_open

    dep = Deployment(tmp_path / "flwr")
    out = tmp_path / "run"
    try:
        dep.sh("start", "2")
        proc = dep.sh("run", overrides(out), timeout=600)
        assert "server finished" in proc.stdout + proc.stderr
        rows = read_metrics(out)
        assert [r["round"] for r in rows] == [0, 1, 2]  # the run completed all rounds
        ckpt = out / rows[-1]["checkpoint"]
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "fedmllm-state.npz").is_file()
        # Each reply passed the strategy's key check against the global adapter, and its bytes are
        # exactly the trainable adapter's: no base weight, embedding or vision tower travelled.
        expected, keys = adapter_bytes_and_keys()
        for r in rows[1:]:
            assert r["bytes_up_per_client"] == {"0": expected, "1": expected}
            assert r["bytes_down"] == 2 * expected
        with safe_open(str(ckpt / "adapter_model.safetensors"), "np") as f:
            assert set(f.keys()) == keys
        assert all("lora_" in k or "multi_modal_projector" in k for k in keys)
        pids = {name: dep.pid(name) for name in ("superlink", "supernode-0", "supernode-1")}
        stopped = dep.sh("stop").stdout
        for name, pid in pids.items():
            assert f"stopped {name} (PID {pid})" in stopped
        assert dep.wait_stopped() == []  # no SuperLink, SuperNode, ServerApp or ClientApp left
    finally:
        dep.close()
