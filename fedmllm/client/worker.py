"""One training process per SuperNode that outlives Flower's one-message ClientApp processes.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message, so each round would pay
Python start-up, importing torch/transformers/peft/bitsandbytes and loading the model again
(bench/deploy.py: about 10 s for smol-llava, a third of a demo round). In deployment the ClientApp
hands the message to its SuperNode's worker instead, over a Unix socket: the first message starts
the worker, which keeps the imports and the model (fedmllm.models' per-process cache) and serves
every later message; the ClientApp process itself imports flwr and numpy only.

Lifetime: a worker belongs to one SuperNode. It runs in the SuperNode's process group (stopping the
group, as `scripts/deploy.sh stop` does, stops it), exits within a second of the SuperNode's death,
after `FEDMLLM_WORKER_IDLE_S` seconds without a message (default 900), when another version of the
app starts a worker for the same SuperNode, or on a `stop` request. Its output goes where the
SuperNode's goes.

Security: requests are pickles, so the socket lives in a directory only this user may enter
(mode 0700, `FEDMLLM_WORKER_DIR` or `$TMPDIR/fedmllm-<uid>`); no other user can talk to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from fedmllm.config import ConfigError

IDLE_S = 900.0
START_TIMEOUT_S = 300.0
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class WorkerError(RuntimeError):
    """The worker died or could not be started; the message fails with this and the next starts a new one."""


def wanted(node_config: dict[str, Any]) -> bool:
    """node_config `worker` (true|false); without it: on exactly when this process is a
    `flwr-clientapp` (one process per message, i.e. deployment), off in simulation."""
    value = node_config.get("worker")
    if value is None:
        return Path(sys.argv[0]).name == "flwr-clientapp"
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE

    raise ConfigError(
        f"node_config worker={value!r} must be true or false; restart the SuperNode with "
        '--node-config "... worker=false" to train inside each ClientApp process instead'
    )


def socket_dir() -> Path:
    """The private directory holding this user's worker sockets (created 0700; refused if others may enter)."""

    base = Path(os.environ.get("FEDMLLM_WORKER_DIR") or Path(tempfile.gettempdir()) / f"fedmllm-{os.getuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerError(
            f"worker socket directory {base} must belong to this user with mode 0700 "
            f"(it has uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); remove it or set "
            "FEDMLLM_WORKER_DIR to a private directory"
        )
    # another user who may write to a parent without the sticky bit can rename this directory
    # away and put their own in its place between our check and our use of it
    for parent in base.resolve().parents:
        pst = parent.stat()
        if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
            raise WorkerError(
                f"worker socket directory {base} sits in {parent}, which everyone may write to "
                f"and which lacks the sticky bit (mode {oct(pst.st_mode & 0o7777)}); set "
                "FEDMLLM_WORKER_DIR to a directory under a private or sticky parent"
            )
    return base


def package_root() -> Path:
    """The directory holding the `fedmllm` package this process runs (the installed FAB's, in deployment)."""
    return Path(__file__).resolve().parents[2]


def socket_path(supernode_pid: int) -> Path:
    """One socket per SuperNode and app version (the code's location and the interpreter)."""
    version = hashlib.sha1(f"{package_root()}|{sys.executable}".encode()).hexdigest()[:12]
    path = socket_dir() / f"{supernode_pid}-{version}.sock"
    if len(os.fsencode(path)) > 100:  # AF_UNIX paths are limited to 107 bytes
        raise WorkerError(
            f"worker socket path {path} is too long for a Unix socket; set FEDMLLM_WORKER_DIR to a shorter directory"
        )
    return path


# ---- framing: 8-byte length + pickle ---------------------------------------------------------


def _send(conn: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(struct.pack("!Q", len(data)))
    conn.sendall(data)


def _recv(conn: socket.socket) -> Any:
    (n,) = struct.unpack("!Q", _exactly(conn, 8))
    return pickle.loads(_exactly(conn, n))


def _exactly(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return buf


# ---- the ClientApp's side ------------------------------------------------------------------


def _connect(path: Path, timeout: float | None = None) -> socket.socket | None:
    """A connection to the worker at `path`, or None (no worker; a dead one's socket file is removed)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except FileNotFoundError:
        conn.close()
        return None
    except (ConnectionRefusedError, socket.timeout):
        conn.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    conn.settimeout(None)
    return conn


def _ask(path: Path, op: str, timeout: float | None = None, wait: bool = True) -> tuple[bool, Any]:
    """Send the control request `op` ("ping", "stop") to the worker at `path`: (whether one
    listens, its reply, or None when not waiting for it: a busy worker answers after its message)."""
    conn = _connect(path, timeout)
    if conn is None:
        return False, None
    with conn:
        _send(conn, (op, None))
        if not wait:
            return True, None
        with contextlib.suppress(EOFError, OSError):  # a stopping worker may close first
            return True, _recv(conn)[1]
    return True, None


def _retire_others(path: Path) -> None:
    """Ask this SuperNode's workers of other app versions to stop (they hold a model each)."""
    prefix = path.name.split("-")[0] + "-"
    for other in path.parent.glob(prefix + "*.sock"):
        if other != path:
            with contextlib.suppress(OSError):
                _ask(other, "stop", timeout=2.0, wait=False)


def start(supernode_pid: int, path: Path) -> subprocess.Popen:
    """Start this SuperNode's worker (same process group, output where the ClientApp's goes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root()), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "fedmllm.client.worker", str(path), str(supernode_pid)],
        env=env,
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )


def connect_or_start(supernode_pid: int | None = None) -> socket.socket:
    """A connection to this SuperNode's worker, starting one when there is none. `supernode_pid`:
    the process that launches the ClientApps (default: this process's parent, which in Flower 1.42 is
    the SuperNode's `flower-superexec`; it exits with the SuperNode)."""

    supernode_pid = supernode_pid or os.getppid()
    path = socket_path(supernode_pid)
    with open(path.with_suffix(".lock"), "w") as lock:  # two ClientApps of one SuperNode start one worker
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        _retire_others(path)
        proc = start(supernode_pid, path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (conn := _connect(path)) is None:
            if proc.poll() is not None:
                raise WorkerError(
                    f"the fedmllm worker (PID {proc.pid}) exited with code {proc.returncode} before "
                    "serving; its error is in this SuperNode's output"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise WorkerError(
                    f"the fedmllm worker (PID {proc.pid}) did not listen on {path} within {START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.05)
        return conn


def call(request: Any, supernode_pid: int | None = None) -> Any:
    """Run `fedmllm.client.rounds.train_request(request)` in this SuperNode's worker and return its result;
    an exception raised there is raised here (a worker that dies mid-message: WorkerError)."""
    with connect_or_start(supernode_pid) as conn:
        _send(conn, ("train", request))
        try:
            status, payload = _recv(conn)
        except (EOFError, ConnectionResetError) as err:
            raise WorkerError(
                "the fedmllm worker died while training this message (killed, or out of memory?); "
                "the next message starts a new one; see this SuperNode's output"
            ) from err
    if status == "error":
        raise payload
    return payload


def ping(supernode_pid: int) -> int | None:
    """The PID of this SuperNode's worker (this app version), or None when none runs."""
    return _ask(socket_path(supernode_pid), "ping")[1]


def stop(supernode_pid: int) -> bool:
    """Ask this SuperNode's worker (this app version) to stop; False when none runs."""
    return _ask(socket_path(supernode_pid), "stop")[0]


# ---- the worker's side ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped by its parent, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling, else a RuntimeError naming its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001  any unpicklable exception
        return RuntimeError(f"{type(err).__name__}: {err}")


def serve(path: Path, supernode_pid: int, idle_s: float = IDLE_S) -> None:
    """Listen on `path` and train one message at a time until stopped, idle or orphaned."""
    from fedmllm.client.rounds import train_request  # the worker's imports (torch's come with its first model)

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp))
    listener.listen(8)
    os.replace(tmp, path)  # visible only once it accepts
    inode = path.stat().st_ino

    def cleanup() -> None:  # the socket (if still ours) and the start lock go with the worker
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:
                path.unlink()
        with contextlib.suppress(OSError):
            path.with_suffix(".lock").unlink()

    def terminate(signum, frame) -> None:  # SIGTERM (deploy.sh stop, docker stop): clean up, then exit
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)

    def watch() -> None:
        while _alive(supernode_pid):
            time.sleep(0.5)
        print(f"fedmllm worker {os.getpid()}: SuperNode {supernode_pid} is gone; exiting", file=sys.stderr, flush=True)
        cleanup()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    print(
        f"fedmllm worker {os.getpid()}: serving the ClientApps of SuperNode process {supernode_pid} at {path}",
        file=sys.stderr,
        flush=True,
    )
    listener.settimeout(1.0)
    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if time.monotonic() - last > idle_s:
                    print(
                        f"fedmllm worker {os.getpid()}: idle for {idle_s:.0f} s; exiting", file=sys.stderr, flush=True
                    )
                    return
                continue
            with conn:
                conn.settimeout(None)
                try:
                    op, payload = _recv(conn)
                except (EOFError, OSError, pickle.UnpicklingError):
                    continue
                if op == "ping":
                    with contextlib.suppress(OSError):
                        _send(conn, ("ok", os.getpid()))
                    continue
                if op == "stop":
                    with contextlib.suppress(OSError):
                        _send(conn, ("ok", None))
                    return
                try:
                    reply = ("ok", train_request(payload))
                except Exception as err:  # noqa: BLE001  the message fails, the worker goes on
                    traceback.print_exc()
                    reply = ("error", _portable(err))
                with contextlib.suppress(OSError):  # the ClientApp may have been stopped meanwhile
                    _send(conn, reply)
            last = time.monotonic()
    finally:
        cleanup()
        listener.close()


def main(argv: list[str]) -> None:
    path, supernode_pid = Path(argv[0]), int(argv[1])
    serve(path, supernode_pid, float(os.environ.get("FEDMLLM_WORKER_IDLE_S", IDLE_S)))


if __name__ == "__main__":
    main(sys.argv[1:])
