"""`flwr run .` with Hydra overrides through run_config, on a SuperLink the test starts and stops."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_e2e import assert_none_left, ray_processes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def superlink_processes(flwr_home: Path) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "flower-superlink" in line and str(flwr_home) in line]


VENV_BIN = Path(sys.executable).parent  # flower-superlink and flwr live beside this python


def flwr_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        **extra,
        "PATH": str(VENV_BIN) + os.pathsep + os.environ.get("PATH", ""),
    }


def tiny_run(outdir: Path, *extra: str) -> str:
    return " ".join(
        [
            "model=tiny-llava num_clients=2 clients_per_round=2 num_rounds=2 train.local_steps=2",
            "train.batch_size=4 dataset.eval_samples=16",
            *extra,
            f"out_dir={outdir}",
        ]
    )


def test_flwr_run_with_overrides_completes_and_leaves_nothing_running(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    outdir = tmp_path / "run"
    env = flwr_env(flwr_home, FEDMLLM_SUPERLINK_PORT=str(free_port()))
    overrides = tiny_run(outdir)
    before = ray_processes()
    pyproject = (ROOT / "pyproject.toml").read_text()
    try:
        proc = subprocess.run(
            [str(ROOT / "scripts" / "flwr_sim.sh"), overrides],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        rows = (outdir / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3  # rounds 0, 1, 2: num_rounds=2 reached the ServerApp
        assert not superlink_processes(flwr_home)
        assert (ROOT / "pyproject.toml").read_text() == pyproject  # flwr must not migrate/rewrite it
    finally:
        pid_file = flwr_home / "superlink.pid"
        if pid_file.exists():  # the script died before its trap: stop its SuperLink by PID
            subprocess.run(["kill", "-KILL", "--", f"-{pid_file.read_text().strip()}"])
    assert_none_left(before)


def test_flwr_build_ships_the_package_and_nothing_else(tmp_path):
    """The FAB every SuperNode installs holds fedmllm/ (code, conf, hub configs) and the project
    files, no tests, benchmarks, docs or deployment files (pyproject's fab-exclude)."""
    import zipfile

    env = flwr_env(tmp_path / "flwr-home")
    proc = subprocess.run(
        [str(VENV_BIN / "flwr"), "build", "--app", str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert {n.split("/")[0] for n in names} == {"fedmllm", "pyproject.toml", "README.md", ".info"}
    assert "fedmllm/conf/config.yaml" in names and "fedmllm/server/app.py" in names


def test_flwr_run_dot_with_flowers_managed_local_superlink(tmp_path):
    """What a Flower user types: `flwr run .` with a fresh FLWR_HOME starts Flower's managed local
    SuperLink (simulation), runs the apps with the overrides, and leaves that SuperLink running,
    as the README says; the test stops it by PID."""
    flwr_home = tmp_path / "flwr-home"
    outdir = tmp_path / "run"
    env = flwr_env(
        flwr_home,
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    overrides = tiny_run(outdir, "server_stage=none")
    before = ray_processes()
    pyproject = (ROOT / "pyproject.toml").read_text()
    try:
        proc = subprocess.run(
            [
                str(VENV_BIN / "flwr"),
                "run",
                ".",
                "--run-config",
                f"overrides='{overrides}'",
                "--federation-config",
                "num-supernodes=2",
                "--stream",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        rows = (outdir / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3, log[-4000:]
        assert superlink_processes(flwr_home)  # Flower's managed SuperLink outlives the command
        assert (ROOT / "pyproject.toml").read_text() == pyproject
    finally:
        for line in superlink_processes(flwr_home):
            subprocess.run(["kill", "-TERM", line.split()[0]])
        deadline = time.time() + 30
        while superlink_processes(flwr_home) and time.time() < deadline:
            time.sleep(0.5)
        for line in superlink_processes(flwr_home):
            subprocess.run(["kill", "-KILL", line.split()[0]])
    assert not superlink_processes(flwr_home)
    assert_none_left(before)
