"""Deployment: a real SuperLink and SuperNodes on 127.0.0.1 (scripts/deploy.sh), tiny-llava."""

from __future__ import annotations

import sys

import pytest
from conftest import tiny_overrides
from deployment import ROOT, Deployment

from fedmllm.tracking import read_metrics

pytestmark = pytest.mark.slow


def overrides(out_dir, clients: int = 2, rounds: int = 2, *extra: str) -> str:
    """tiny-llava, 1 local step; no server stage (it costs a minute and is not deployment)."""
    base = [o for o in tiny_overrides() if not o.startswith(("num_clients=", "clients_per_round=", "num_rounds="))]
    return " ".join(
        [
            *base,
            f"num_clients={clients}",
            f"clients_per_round={clients}",
            f"num_rounds={rounds}",
            "train.local_steps=1",
            "dataset.eval_samples=8",
            "server_stage=none",
            f"out_dir={out_dir}",
            *extra,
        ]
    )


def rounds_logged(out_dir) -> list[dict]:
    return read_metrics(out_dir) if (out_dir / "metrics.jsonl").is_file() else []


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


def test_tls_authenticated_supernodes_run_two_rounds_exchanging_adapters_only(tmp_path):
    """The acceptance run, over TLS with SuperNode authentication: SuperLink + 2 registered SuperNodes
    on 127.0.0.1, 2 rounds of tiny-llava; a SuperNode with an unregistered key, and one that does not
    trust the SuperLink's CA, are refused; every process is stopped by PID."""
    import subprocess

    from safetensors import safe_open

    tls = tmp_path / "tls"
    certs = [sys.executable, str(ROOT / "scripts" / "certs.py")]
    subprocess.run([*certs, "tls", str(tls)], check=True, capture_output=True)
    subprocess.run([*certs, "node-keys", str(tls), "3"], check=True, capture_output=True)  # node-2: never registered
    subprocess.run([*certs, "tls", str(tmp_path / "other-ca")], check=True, capture_output=True)
    dep = Deployment(tmp_path / "flwr", tls_dir=tls, node_auth=True)
    out = tmp_path / "run"
    try:
        dep.sh("start", "2")
        intruder = dep.refused_supernode(
            ["--root-certificates", str(tls / "ca.pem"), "--auth-supernode-private-key", str(tls / "node-2.key")]
        )
        assert "Failed to activate SuperNode" in intruder, intruder[-2000:]
        assert "No SuperNode found with the given public key" in dep.log("superlink")
        wrong_ca = dep.refused_supernode(
            [
                "--root-certificates",
                str(tmp_path / "other-ca" / "ca.pem"),
                "--auth-supernode-private-key",
                str(tls / "node-0.key"),
            ]
        )
        assert "could not establish a connection" in wrong_ca, wrong_ca[-2000:]
        assert dep.online_nodes() == 2

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
        for name in ("supernode-0", "supernode-1"):  # one worker per SuperNode trained both rounds
            assert dep.log(name).count(": serving the ClientApps of SuperNode process") == 1, dep.log(name)[-3000:]
        pids = {name: dep.pid(name) for name in ("superlink", "supernode-0", "supernode-1")}
        stopped = dep.sh("stop").stdout
        for name, pid in pids.items():
            assert f"stopped {name} (PID {pid})" in stopped
        assert dep.wait_stopped() == []  # no SuperLink, SuperNode, ServerApp, ClientApp or worker left
    finally:
        dep.close()
