"""The per-SuperNode worker (fedmllm.client.worker): same results as training in the ClientApp,
one process kept across messages, errors carried back, and no worker outliving its SuperNode."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_overrides

from fedmllm.client import worker
from fedmllm.config import ConfigError


@pytest.fixture
def sockets(monkeypatch):
    """A private socket directory with a short path (Unix socket paths are limited to 107 bytes,
    and pytest's tmp_path can be longer)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="fw-", dir="/tmp")
    monkeypatch.setenv("FEDMLLM_WORKER_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def supernode():
    """A stand-in SuperNode process the worker belongs to; killed (with its worker) at the end."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    pid = worker.ping(proc.pid) if proc.poll() is None else None
    proc.kill()
    proc.wait()
    if pid:
        wait_dead(pid)


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not worker._alive(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return False


def request(cfg_overrides: list[str], node_config: dict, server_round: int = 1):
    from fedmllm.algorithms import server_peft
    from fedmllm.client.request import TrainRequest
    from fedmllm.config import compose
    from fedmllm.models import get_model
    from fedmllm.models.adapter import adapter_state
    from fedmllm.stages.cache import model_config

    cfg = compose(cfg_overrides)
    arrays = {k: np.array(v) for k, v in adapter_state(get_model(model_config(cfg), server_peft(cfg)).model).items()}
    return TrainRequest(
        run_config={"overrides": " ".join(cfg_overrides)},
        node_config=node_config,
        arrays=arrays,
        config={"server-round": server_round},
    )


def test_wanted_reads_node_config_and_defaults_to_off_outside_flwr_clientapp():
    assert worker.wanted({}) is False  # pytest is no flwr-clientapp: simulation trains in-process
    assert worker.wanted({"worker": "true"}) and worker.wanted({"worker": True}) and worker.wanted({"worker": 1})
    assert not worker.wanted({"worker": "false"}) and not worker.wanted({"worker": "0"})
    with pytest.raises(ConfigError, match="node_config worker='maybe' must be true or false"):
        worker.wanted({"worker": "maybe"})


def test_training_in_the_worker_equals_training_in_process_and_the_worker_is_reused(sockets, supernode):
    from fedmllm.client.rounds import train_request

    ov = tiny_overrides("server_stage=none", "model.quantization=none")
    req = request(ov, {"partition-id": 0, "num-partitions": 2})
    out, metrics, extra, state = train_request(req)
    assert worker.ping(supernode.pid) is None
    w_out, w_metrics, w_extra, w_state = worker.call(req, supernode.pid)
    pid = worker.ping(supernode.pid)
    assert pid and pid != os.getpid()
    assert set(w_out) == set(out)
    for k in out:
        np.testing.assert_array_equal(w_out[k], out[k])
    assert w_metrics["train-loss"] == metrics["train-loss"] and w_metrics["num-examples"] == metrics["num-examples"]
    assert w_extra == extra == {} and w_state == state == {}
    # a second message: the same process serves it, with the model already loaded
    again = worker.call(request(ov, {"partition-id": 1, "num-partitions": 2}, 2), supernode.pid)
    assert worker.ping(supernode.pid) == pid
    assert again[1]["partition-id"] == 1
    assert again[1]["setup-seconds"] < w_metrics["setup-seconds"]


def test_an_error_in_the_worker_fails_the_message_with_it_and_the_worker_goes_on(sockets, supernode, tmp_path):
    ov = tiny_overrides("server_stage=none", "model.quantization=none")
    req = request(ov, {"partition-id": 0, "num-partitions": 2})
    req.node_config = {"partition-id": 0, "num-partitions": 2, "data-dir": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match="node_config data-dir=.* does not exist"):
        worker.call(req, supernode.pid)
    pid = worker.ping(supernode.pid)
    req.node_config = {"partition-id": 0, "num-partitions": 2, "worker": "true"}
    assert worker.call(req, supernode.pid)[1]["num-examples"] > 0
    assert worker.ping(supernode.pid) == pid


def test_the_worker_exits_with_its_supernode(sockets, supernode):
    path = worker.socket_path(supernode.pid)
    worker.connect_or_start(supernode.pid).close()
    pid = worker.ping(supernode.pid)
    supernode.kill()  # a zombie until reaped: that counts as gone too
    assert wait_dead(pid, timeout=10), "the worker outlived its SuperNode"
    assert not path.exists()
    supernode.wait()


def test_the_worker_exits_when_idle_and_a_dead_workers_socket_is_replaced(sockets, supernode, monkeypatch):
    monkeypatch.setenv("FEDMLLM_WORKER_IDLE_S", "1")
    path = worker.socket_path(supernode.pid)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on: what a SIGKILLed worker leaves
    stale.close()
    worker.connect_or_start(supernode.pid).close()
    pid = worker.ping(supernode.pid)
    assert pid is not None
    assert wait_dead(pid, timeout=10), "the idle worker did not exit"
    assert not path.exists() and not path.with_suffix(".lock").exists()


def test_a_terminated_worker_leaves_no_socket_behind(sockets, supernode):
    path = worker.socket_path(supernode.pid)
    worker.connect_or_start(supernode.pid).close()
    pid = worker.ping(supernode.pid)
    os.kill(pid, signal.SIGTERM)  # what deploy.sh stop sends the SuperNode's process group
    assert wait_dead(pid, timeout=10)
    assert os.listdir(sockets) == [] and not path.exists()


def test_a_new_app_version_retires_the_old_worker(sockets, supernode):
    path = worker.socket_path(supernode.pid)
    old_path = path.with_name(f"{supernode.pid}-000000000000.sock")  # the same SuperNode, another version
    old = worker.start(supernode.pid, old_path)
    deadline = time.time() + 60
    while not old_path.exists():
        assert time.time() < deadline and old.poll() is None
        time.sleep(0.05)
    worker.connect_or_start(supernode.pid).close()
    assert old.wait(timeout=20) == 0
    assert worker.ping(supernode.pid) is not None


def test_the_socket_directory_must_be_private(tmp_path, monkeypatch):
    d = tmp_path / "open"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    monkeypatch.setenv("FEDMLLM_WORKER_DIR", str(d))
    with pytest.raises(worker.WorkerError, match="must belong to this user with mode 0700"):
        worker.socket_dir()
