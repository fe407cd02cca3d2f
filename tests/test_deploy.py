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


def test_supernodes_holding_only_their_partitions_train_a_round_without_the_dataset(tmp_path):
    """Issue 20, own data only: the server holds the dataset (its held-out split); each SuperNode
    holds its partition folder and a copy of the images (node_config data-dir + image-root), and
    every Python process of the SuperNodes fails to open any file of the dataset. The round runs
    under secure aggregation (SecAgg+), which this exercises across real processes."""
    import json
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from fedmllm.data.fixtures import write_hateful_memes

    memes = write_hateful_memes(tmp_path / "memes", n_rows=24)
    settings = ["dataset=hateful_memes", f"dataset.root={memes}", "num_clients=2", "clients_per_round=2"]
    part = subprocess.run(
        [sys.executable, "-m", "fedmllm.cli", "partition", *settings, f"out={tmp_path / 'parts'}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert part.returncode == 0, part.stderr[-2000:]
    data_dir = next(line.split()[2] for line in part.stdout.splitlines() if line.startswith("partition dir:"))
    site_images = tmp_path / "site-images"
    shutil.copytree(memes / "img", site_images)  # partition paths are relative to the images folder
    no_dataset = {
        "FEDMLLM_TEST_ABSENT": str(memes),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "assets" / "no_dataset"), str(ROOT)]),
    }
    dep = Deployment(tmp_path / "flwr")
    out = tmp_path / "run"
    try:
        dep.sh("superlink")
        for i in range(2):
            dep.sh("supernode", str(i), "2", f"data-dir={data_dir}", f"image-root={site_images}", env=no_dataset)
        dep.wait_online(2)
        # under SecAgg+ (issue 23): its four stages pass between real processes, and the
        # SuperNodes' Context state carries each client's protocol state from stage to stage
        proc = dep.sh("run", overrides(out, 2, 1, *settings[:2], "secure_aggregation=true"), timeout=600)
        assert "server finished" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = read_metrics(out)
        assert [r["round"] for r in rows] == [0, 1]
        assert rows[1]["bytes_up"] == 0 and rows[1]["train_loss"] is not None  # masked uploads, aggregated
        assert (out / "checkpoints" / "round-1").is_dir()
        stats = json.loads((Path(data_dir) / "stats.json").read_text())
        # each site trained on its own partition: its weight is that partition's size
        assert {c["partition-id"]: c["num-examples"] for c in rows[1]["clients"]} == {
            c["client"]: c["num_samples"] for c in stats
        }
        assert all(not c.get("dropped") for c in rows[1]["clients"])
        for name in ("supernode-0", "supernode-1"):
            assert "this site holds no copy" not in dep.log(name)
    finally:
        dep.close()
