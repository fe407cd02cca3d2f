"""Faults a client, a crash or a typo can cause, in one place (docs/reliability.md lists what each
test guarantees). Bad replies: tests/test_strategy.py; bad config values: tests/test_config.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

ASSETS = Path(__file__).parent / "assets"

pytestmark = pytest.mark.slow


def _common(*extra: str) -> list[str]:
    return tiny_overrides("server_stage=none", "dataset.eval_samples=8", *extra)


def _state(run_dir: Path, rnd: int) -> dict[str, np.ndarray]:
    from fedmllm.server.checkpoint import read_state_flat

    return read_state_flat(run_dir / "checkpoints" / f"round-{rnd}" / "fedmllm-state.npz")


def test_scaffold_cut_short_mid_round_resumes_like_an_uninterrupted_run(tmp_path):
    """A run killed during round 3: its clients wrote their round-3 control variates, the server
    never checkpointed round 3. The resumed run redoes round 3 from the round-2 client state and
    ends where an uninterrupted run ends."""
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    common = _common("aggregator=scaffold")
    full, part = tmp_path / "full", tmp_path / "part"
    run_in_process([*common, "num_rounds=4", f"out_dir={full}"])
    run_in_process([*common, "num_rounds=3", f"out_dir={part}"])
    # the kill: round 3's checkpoint and metrics row never made it; the clients' state files did
    shutil.rmtree(part / "checkpoints" / "round-3")
    assert (part / "client-state" / "partition-0-round-3.npz").is_file()
    run_in_process([*common, "num_rounds=4", f"out_dir={part}", f"resume={part}"])
    a, b = _state(full, 4), _state(part, 4)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert [r["round"] for r in read_metrics(part)] == [0, 1, 2, 3, 4]  # round 3's row once


def test_a_damaged_checkpoint_falls_back_to_the_round_before_and_metrics_are_rewritten(tmp_path, capsys):
    from inprocess import run_in_process

    from fedmllm.server.checkpoint import latest_state
    from fedmllm.tracking import read_metrics

    common = _common("num_rounds=3", f"out_dir={tmp_path}")
    run_in_process(common)
    state = tmp_path / "checkpoints" / "round-3" / "fedmllm-state.npz"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    assert latest_state(tmp_path)[0] == 2
    assert "round-3 cannot be resumed from: fedmllm-state.npz" in capsys.readouterr().err
    adapter = tmp_path / "checkpoints" / "round-2" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-10])  # the manifest catches what np.load would not
    assert latest_state(tmp_path)[0] == 1
    assert "round-2 cannot be resumed from: adapter_model.safetensors has" in capsys.readouterr().err
    run_in_process([*_common("num_rounds=3", f"out_dir={tmp_path}"), f"resume={tmp_path}"])
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]  # no duplicate rows


def test_resume_refuses_other_settings_and_a_missing_dir_before_touching_the_run(tmp_path):
    from inprocess import run_in_process

    from fedmllm.server.run import ResumeError

    run_in_process(_common("num_rounds=1", f"out_dir={tmp_path}"))
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"peft.r: 16 -> 4"):
        run_in_process([*_common("num_rounds=2", f"out_dir={tmp_path}", "peft.r=4"), f"resume={tmp_path}"])
    with pytest.raises(ResumeError, match=r"model.quantization: '4bit' -> 'none'"):
        run_in_process(
            [*_common("num_rounds=2", f"out_dir={tmp_path}", "model.quantization=none"), f"resume={tmp_path}"]
        )
    assert (tmp_path / "config.yaml").read_text() == saved  # the record of what the run was
    with pytest.raises(ResumeError, match="raise num_rounds"):
        run_in_process([*_common("num_rounds=1", f"out_dir={tmp_path}"), f"resume={tmp_path}"])


def test_a_run_in_which_no_round_aggregated_fails_with_the_reason(tmp_path):
    from inprocess import run_in_process

    from fedmllm.server.run import NoRoundAggregated

    with pytest.raises(
        NoRoundAggregated, match=r"no round of 2 aggregated.*update norm .* > aggregator.max_update_norm"
    ):
        run_in_process(_common(f"out_dir={tmp_path}", "aggregator.max_update_norm=1e-12"))


def test_cli_resume_of_a_missing_dir_fails_without_creating_it(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "fedmllm.cli", "run", f"resume={missing}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "no such directory" in proc.stderr and not missing.exists()


def test_the_continue_hint_appears_only_where_resuming_can_help(tmp_path):
    from inprocess import run_in_process

    from fedmllm.cli import resume_hint
    from fedmllm.server.run import NoRoundAggregated

    assert resume_hint(str(tmp_path), RuntimeError("boom")) == ""  # nothing checkpointed
    run_in_process(_common("num_rounds=1", f"out_dir={tmp_path}"))
    assert resume_hint(str(tmp_path), RuntimeError("boom")).endswith(f"fedmllm run resume={tmp_path}")
    assert resume_hint(str(tmp_path), NoRoundAggregated("x")) == ""
    manifest = json.loads((tmp_path / "checkpoints" / "round-1" / "manifest.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "fedmllm-state.npz"} <= set(manifest)


def _cli_run(args, **kw):
    import os
    import subprocess
    import sys

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedmllm.cli", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


# 80 local steps: round 2 trains for about 5 s on a 2-core CPU (round 1 pays Ray's start-up), so
# the interruption 1 s after round 1's line lands in it; the checkpoint check below says if not
SCAFFOLD_80 = ("aggregator=scaffold", "num_rounds=2", "train.local_steps=80")


@pytest.fixture(scope="module")
def scaffold_uninterrupted(tmp_path_factory):
    """The uninterrupted run both interruptions are held against (run once for the module)."""
    full = tmp_path_factory.mktemp("scaffold") / "full"
    proc = _cli_run([*_common(*SCAFFOLD_80), f"out_dir={full}"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return full


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_a_scaffold_run_stopped_mid_round_and_resumed_ends_like_an_uninterrupted_one(
    tmp_path, how, scaffold_uninterrupted
):
    """SIGINT: the run stops within seconds with exit 130 and leaves no Ray process; SIGKILL (the
    whole process group, as a machine going down): nothing to clean up by the run itself. Either
    way `resume=` redoes the round that was cut short and ends where an uninterrupted run ends."""
    import os
    import signal
    import time

    from test_e2e import assert_none_left, ray_processes

    common = _common(*SCAFFOLD_80)
    full, part = scaffold_uninterrupted, tmp_path / "part"
    before = ray_processes()
    proc = _cli_run([*common, f"out_dir={part}"], start_new_session=True)
    try:
        for line in proc.stdout:  # round 1 is checkpointed when its line is printed
            if line.startswith("round   1 |"):
                break
        time.sleep(1)  # clients are training round 2, the last
        assert proc.poll() is None, "the run ended before it could be interrupted"
        t0 = time.time()
        if how == "SIGINT":
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 130 and "SIGINT: stopping" in err, err[-2000:]
            assert time.time() - t0 < 30
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in set(ray_processes()) - set(before):  # SIGKILL leaves Ray's daemons: the test stops them
            if how == "SIGKILL":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert_none_left(before)
    assert not (part / "checkpoints" / "round-2").exists()
    proc = _cli_run([*common, f"out_dir={part}", f"resume={part}"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming" in out + err and "after round 1 of 2" in out + err, (out + err)[-2000:]
    a, b = _state(full, 2), _state(part, 2)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_a_png_cut_after_its_header_is_named_when_decoded_and_caught_up_front_with_strict(tmp_path):
    from PIL import Image

    from fedmllm.data import DataError
    from fedmllm.data.collate import load_image
    from fedmllm.data.reading import image_problem

    path = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert image_problem(path) is None  # the header parses: the cheap default check passes it
    kind, detail = image_problem(path, decode=True)
    assert kind == "corrupt image" and str(path) in detail
    with pytest.raises(DataError, match=f"image {path} cannot be decoded.*dataset.strict=true"):
        load_image(str(path))


@pytest.mark.parametrize(
    "cfg,n,fragment",
    [
        ({"name": "iid"}, 40, "num_clients=40 exceeds the 17 training samples"),
        (
            {"name": "dirichlet", "alpha": 0.5},
            4,
            "at least partitioner.min_partition_size=10 of the 17 training samples",
        ),
        ({"name": "dirichlet", "alpha": 1e-6, "min_partition_size": 2}, 4, "alpha=1e-06.*raise partitioner.alpha"),
    ],
)
def test_a_small_dataset_names_the_partition_setting_that_cannot_be_met(cfg, n, fragment):
    from fedmllm.partitioning import label_partition

    with pytest.raises(ValueError, match=fragment):
        label_partition([{"label": label} for label in [0] * 9 + [1] * 8], cfg, n, 42)


def test_an_empty_text_is_kept_as_image_only_and_said_so(tmp_path, capsys):
    import json as _json

    from fedmllm.data import hateful_memes
    from fedmllm.data.fixtures import write_hateful_memes

    root = write_hateful_memes(tmp_path / "hm", n_rows=6, seed=0)
    rows = [_json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    rows[2]["text"] = "  "
    (root / "train.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    samples = hateful_memes.load_split.__wrapped__(str(root), "train")
    assert len(samples) == 6 and samples[2]["text"] is None and samples[2]["image"] is not None
    err = capsys.readouterr().err
    assert "kept 1 rows of" in err and "1 empty text, kept as image-only (line 3)" in err


def test_certs_creates_private_keys_0600_and_a_new_san_reissues_the_server_certificate(tmp_path):
    import os
    import stat
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import certs

    old = os.umask(0)  # the most permissive umask: the keys must still never be readable by others
    try:
        paths = certs.make_tls(tmp_path, [])
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes["ca.key"] == modes["server.key"] == 0o600
    ca = (tmp_path / "ca.pem").read_bytes()
    certs.make_tls(tmp_path, ["10.0.0.5"])
    assert "10.0.0.5" in certs._cert_names(tmp_path / "server.pem")
    assert (tmp_path / "ca.pem").read_bytes() == ca  # nodes keep trusting the same CA
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600


def test_the_worker_socket_dir_is_refused_under_a_world_writable_parent_without_sticky_bit(tmp_path, monkeypatch):
    import os

    from fedmllm.client.worker import WorkerError, socket_dir

    open_parent = tmp_path / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)  # world-writable, no sticky bit
    monkeypatch.setenv("FEDMLLM_WORKER_DIR", str(open_parent / "sockets"))
    with pytest.raises(WorkerError, match="which everyone may write to and which lacks the sticky bit"):
        socket_dir()
    os.chmod(open_parent, 0o1777)  # as /tmp: sticky, so others cannot rename our directory
    assert socket_dir() == open_parent / "sockets"


# --- deployment: a SuperNode killed mid-round, misconfigured SuperNodes, a SuperLink killed -----


def test_killed_supernode_misconfigured_supernodes_and_stopped_superlink_are_survived(tmp_path):
    import os
    import signal

    from deployment import Deployment
    from test_deploy import overrides, rounds_logged

    """3 good SuperNodes (min 2 per round) + 3 misconfigured ones, 3 rounds:
    round 1: SuperNode 2 is killed (SIGKILL) holding its message and restarted -> aggregated from 0 and 1;
    round 2: the restarted SuperNode 2 takes part again;
    round 3: the SuperLink (and its ServerApp) is killed -> `resume` continues from round 2's checkpoint.
    Every round, each misconfigured SuperNode's ClientApp fails its message with an error naming the
    setting, and the round goes on without it."""
    dep = Deployment(tmp_path / "flwr")
    out, log = tmp_path / "run", tmp_path / "run.log"
    ov = overrides(out, 3, 3, "aggregator.min_train_nodes=2", "aggregator.min_available_nodes=2")
    # the good SuperNodes declare a 10 s heartbeat: the killed one is offline after 20 s, not 60 s
    fast = {"PYTHONPATH": os.pathsep.join([str(ASSETS / "fast_heartbeat"), dep.env["PYTHONPATH"]])}
    try:
        dep.sh("start", "3", env=fast)
        dep.raw_supernode("no-id", "num-partitions=3", 20)
        dep.raw_supernode("out-of-range", "partition-id=3 num-partitions=3", 21)
        dep.raw_supernode("no-data", f'partition-id=0 num-partitions=3 data-dir="{tmp_path / "nowhere"}"', 22)
        dep.wait_online(6)
        run = dep.run_async(ov, log)
        started = lambda: "Start `flwr-clientapp`" in dep.log("supernode-2")  # noqa: E731
        dep.wait_for(started, "SuperNode 2 receiving its round-1 message", proc=run, log=log)
        dep.kill("supernode-2")
        dep.sh("supernode", "2", "3", env=fast)  # restarted: it joins with a new node id
        dep.wait_for(lambda: len(rounds_logged(out)) >= 3, "round 2", proc=run, log=log)
        good = ("supernode-0", "supernode-1", "supernode-2")
        for name in good:  # hold round 3 (it needs 2 of them) until the SuperLink is killed below
            dep.signal(name, signal.SIGSTOP)
        rows = rounds_logged(out)
        assert len(rows) == 3
        assert set(rows[1]["bytes_up_per_client"]) == {"0", "1"}  # round 1 went on without the killed node
        assert set(rows[2]["bytes_up_per_client"]) == {"0", "1", "2"}  # and it is back in round 2
        reasons = (
            "node_config lacks 'partition-id'",
            "node_config partition-id=3 must be in [0, num-partitions=3)",
            f"node_config data-dir='{tmp_path / 'nowhere'}' does not exist",
        )
        # rounds 1 and 2, each from its node; `flwr run --stream` may print them after round 2's metrics are written
        dep.wait_for(
            lambda: all(log.read_text(errors="replace").count(r) >= 2 for r in reasons),
            "each misconfigured node's error in rounds 1 and 2",
            timeout=120,
            proc=run,
            log=log,
        )
        assert "restart the SuperNode with --node-config" in log.read_text()

        dep.kill("superlink")  # mid-run: round 3 has started
        for name in good:
            dep.signal(name, signal.SIGCONT)
        assert run.wait(timeout=120) != 0
        assert len(rounds_logged(out)) == 3
        dep.sh("superlink")  # the same state database: the SuperNodes reconnect by themselves
        # round_timeout: a misconfigured SuperNode still holding the killed run's message can lose its
        # error reply to the resumed run (Flower 1.42, seen once in a suite run); the round then goes on
        # without it after 240 s instead of Flower's hour
        dep.wait_online(3)
        proc = dep.sh(
            "run",
            overrides(
                out,
                3,
                3,
                "aggregator.min_train_nodes=2",
                "aggregator.min_available_nodes=2",
                "round_timeout=240",
                f"resume={out}",
            ),
            timeout=600,
        )
        assert f"resuming {out} after round 2 of 3" in proc.stdout + proc.stderr
        assert [r["round"] for r in rounds_logged(out)] == [0, 1, 2, 3]
        assert (out / "checkpoints" / "round-3" / "fedmllm-state.npz").is_file()
        dep.sh("stop")
        assert dep.wait_stopped() == []
    finally:
        dep.close()


def test_deploy_sh_fails_a_supernode_that_does_not_trust_the_superlink(tmp_path):
    """A SuperNode with another CA exits 305 on the TLS handshake: `deploy.sh supernode` says so
    with Flower's exit code and fails, instead of reporting it started."""
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    certs = [sys.executable, str(root / "scripts" / "certs.py"), "tls"]
    subprocess.run([*certs, str(tmp_path / "a")], check=True, capture_output=True)
    subprocess.run([*certs, str(tmp_path / "b")], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "home"),
        "FEDMLLM_PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # the handshake fails seconds after start, later on a loaded machine (over the default 5 s
        # once, beside a training job); a SuperNode that fails exits early, so a longer settle costs nothing
        "FEDMLLM_NODE_SETTLE": "60",
    }
    sh = [str(root / "scripts" / "deploy.sh")]

    def deploy(tls: str, *args: str):
        return subprocess.run(
            [*sh, *args],
            env={**env, "FEDMLLM_TLS_DIR": str(tmp_path / tls)},
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        assert deploy("a", "superlink").returncode == 0
        proc = deploy("b", "supernode", "0", "1")
        assert proc.returncode != 0
        assert "supernode-0 exited at start" in proc.stderr and "Exit Code: 305" in proc.stderr
    finally:
        deploy("a", "stop")
