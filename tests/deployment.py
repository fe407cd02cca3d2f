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
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
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

    def sh(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run `scripts/deploy.sh ARGS` and remember the processes it started."""
        proc = subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        self._remember()
        if check:
            assert proc.returncode == 0, f"deploy.sh {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def run_async(self, overrides: str, log: Path) -> subprocess.Popen:
        """`deploy.sh run OVERRIDES` in the background (its own process group), output to `log`."""
        with open(log, "w") as f:
            proc = subprocess.Popen([str(SCRIPT), "run", overrides], cwd=ROOT, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.started.add(proc.pid)
        return proc

    def pid(self, name: str) -> int:
        return int((self.home / "pids" / f"{name}.pid").read_text())

    def log(self, name: str) -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    def _remember(self) -> None:
        for f in (self.home / "pids").glob("*.pid"):
            self.started.add(int(f.read_text()))

    def left_running(self) -> list[str]:
        """Processes still alive in any process group this deployment started."""
        groups = process_groups()
        return [line for pgid in self.started for line in groups.get(pgid, [])]

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

    def wait_stopped(self, timeout: float = 20) -> list[str]:
        deadline = time.time() + timeout
        while self.left_running() and time.time() < deadline:
            time.sleep(0.3)
        return self.left_running()
