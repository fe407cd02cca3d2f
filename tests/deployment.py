"""A real deployment for tests: scripts/deploy.sh on 127.0.0.1 free ports, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "deploy.sh"


def free_port_block(n: int = 40) -> int:
    """A port p such that p .. p+n-1 look free (the SuperLink takes p, SuperNode i takes p+10+i)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports on 127.0.0.1")


def process_groups() -> dict[int, list[str]]:
    """{pgid: [`pid args`, ...]} of every process on this machine."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    groups: dict[int, list[str]] = {}
    for line in out.splitlines():
        pid, pgid, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (*line.split(), "")
        groups.setdefault(int(pgid), []).append(f"{pid} {args}")
    return groups


class Deployment:
    """scripts/deploy.sh with a private FLWR_HOME and ports; every process group it started is
    remembered, and `close()` stops them by PID (also when a test fails half-way)."""

    def __init__(self, home: Path, tls_dir: Path | None = None, node_auth: bool = False):
        self.home = home
        self.port = free_port_block()
        venv_bin = str(Path(sys.executable).parent)  # flower-superlink, flower-supernode, flwr
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FEDMLLM_PORT": str(self.port),
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        if tls_dir is not None:
            self.env["FEDMLLM_TLS_DIR"] = str(tls_dir)
        if node_auth:
            self.env["FEDMLLM_NODE_AUTH"] = "1"
        self.started: set[int] = set()  # process-group leaders, from the pid files

    def sh(
        self, *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run `scripts/deploy.sh ARGS` (with `env` added to the deployment's environment) and
        remember the processes it started."""
        proc = subprocess.run(
            [str(SCRIPT), *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self._remember()
        if check:
            assert proc.returncode == 0, f"deploy.sh {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def run_async(self, overrides: str, log: Path) -> subprocess.Popen:
        """`deploy.sh run OVERRIDES` in the background (its own process group), output to `log`."""
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [str(SCRIPT), "run", overrides],
                cwd=ROOT,
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.add(proc.pid)
        return proc

    def raw_supernode(self, name: str, node_config: str, port_offset: int) -> None:
        """`flower-supernode` with exactly `node_config` (the script always sets partition-id);
        its PID goes beside the script's, so `deploy.sh stop` stops it too."""
        log = open(self.home / "logs" / f"supernode-{name}.log", "w")
        proc = subprocess.Popen(
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port + port_offset),
                "--node-config",
                node_config,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        (self.home / "pids" / f"supernode-{name}.pid").write_text(str(proc.pid))
        self.started.add(proc.pid)

    def refused_supernode(self, tls_args: list[str], timeout: float = 90) -> str:
        """Start a SuperNode with `tls_args` that the SuperLink must refuse; return its output once
        it has given up (it must exit non-zero)."""
        log = self.home / "logs" / f"refused-{len(list(self.home.glob('logs/refused-*')))}.log"
        with open(log, "w") as f:  # a file, not a pipe: a child of the SuperNode may hold a pipe open
            proc = subprocess.Popen(
                [
                    "flower-supernode",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port + 30),
                    "--max-retries",
                    "2",
                    *tls_args,
                    "--node-config",
                    "partition-id=0 num-partitions=2",
                ],
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.add(proc.pid)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(
                f"the SuperNode was not refused within {timeout} s:\n{log.read_text(errors='replace')[-2000:]}"
            ) from None
        output = log.read_text(errors="replace")
        assert proc.returncode != 0, output[-2000:]
        return output

    def online_nodes(self) -> int:
        """SuperNodes the SuperLink lists as online (`flwr supernode list`)."""
        import json

        proc = subprocess.run(
            ["flwr", "supernode", "list", "fedmllm-deploy", "--format", "json"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            nodes = json.loads(proc.stdout[proc.stdout.index("{") :])["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(n["status"] == "online" for n in nodes)

    def wait_online(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while (k := self.online_nodes()) < n:
            assert time.time() < deadline, f"{k} of {n} SuperNodes online after {timeout} s"
            time.sleep(1)

    def kill(self, name: str) -> None:
        """SIGKILL a process group the script started (a crash: no goodbye to the SuperLink)."""
        pid = self.pid(name)
        os.killpg(pid, signal.SIGKILL)
        self.wait_for(
            lambda: (
                not any(
                    line.split()[0] == str(pid) and "<defunct>" not in line for line in process_groups().get(pid, [])
                )
            ),
            f"{name} to die",
            timeout=30,
        )

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to the process group the script started as `name` (SIGSTOP / SIGCONT: pause a node)."""
        os.killpg(self.pid(name), sig)

    def pid(self, name: str) -> int:
        return int((self.home / "pids" / f"{name}.pid").read_text())

    def log(self, name: str) -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    def _remember(self) -> None:
        for f in (self.home / "pids").glob("*.pid"):
            self.started.add(int(f.read_text()))

    def left_running(self) -> list[str]:
        """Processes still alive (zombies aside) in any process group this deployment started."""
        groups = process_groups()
        return [line for pgid in self.started for line in groups.get(pgid, []) if "<defunct>" not in line]

    def close(self) -> None:
        """Stop everything: the script's own `stop`, then SIGKILL to any group still alive."""
        self._remember()
        try:
            subprocess.run([str(SCRIPT), "stop"], cwd=ROOT, env=self.env, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pgid in self.started:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def wait_for(
        predicate, what: str, timeout: float = 600, proc: subprocess.Popen | None = None, log: Path | None = None
    ) -> None:
        """Poll `predicate` until true; fail naming `what` (and the tail of `log`) on timeout or
        when `proc` exits first."""
        deadline = time.time() + timeout
        while not predicate():
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            assert proc is None or proc.poll() is None, f"run exited ({proc.returncode}) before {what}:\n{tail}"
            assert time.time() < deadline, f"timed out waiting for {what}:\n{tail}"
            time.sleep(0.5)

    def wait_stopped(self, timeout: float = 20) -> list[str]:
        deadline = time.time() + timeout
        while self.left_running() and time.time() < deadline:
            time.sleep(0.3)
        return self.left_running()
