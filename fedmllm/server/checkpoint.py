"""PEFT-format checkpoints: adapter_model.safetensors + adapter_config.json per round."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

from fedmllm.models.adapter import load_adapter_state


def save_checkpoint(model, arrays: dict[str, np.ndarray], run_dir: Path, server_round: int) -> Path:
    """Write the global adapter of a round, loadable with `PeftModel.from_pretrained(base, dir)`."""
    out = Path(run_dir) / "checkpoints" / f"round-{server_round}"
    load_adapter_state(model, arrays)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # write aside, then rename: a crash mid-write never leaves a half checkpoint under round-<N>
    model.save_pretrained(tmp, save_embedding_layers=False)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


STATE_FILE = "fedmllm-state.npz"  # next to the PEFT files: shared payload + strategy state + round


def save_strategy_state(ckpt_dir: Path, server_round: int, payload: dict[str, np.ndarray], state: dict) -> Path:
    """What `fedmllm run resume=<run dir>` needs to continue after this round: the global payload
    as it travels (`global/<key>`), the strategy's state (`state/<attr>/<key>`) and the round."""
    arrays = {f"global/{k}": np.asarray(v) for k, v in payload.items()}
    arrays.update({f"state/{k}": np.asarray(v) for k, v in state.items()})
    arrays["round"] = np.asarray(server_round)
    out = Path(ckpt_dir) / STATE_FILE
    tmp = out.with_name("tmp-" + out.name)
    np.savez(tmp, **arrays)
    tmp.replace(out)
    return out


MANIFEST = "manifest.json"  # every file of a round's checkpoint with its size and sha256, written last


def write_manifest(ckpt_dir: Path) -> Path:
    """Record the size and sha256 of every file in a round's checkpoint dir, atomically (written
    last: a round whose manifest exists was written completely)."""
    ckpt_dir = Path(ckpt_dir)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith("tmp-")}
    tmp = ckpt_dir / f"tmp-{MANIFEST}"
    tmp.write_text(json.dumps(files, indent=1))
    tmp.replace(ckpt_dir / MANIFEST)
    return ckpt_dir / MANIFEST


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_round(ckpt_dir: Path) -> str | None:
    """Why a round's checkpoint cannot be resumed from, or None: its manifest's files must all be
    there with their sizes and hashes (a checkpoint from before manifests is taken as it is)."""
    manifest = Path(ckpt_dir) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({err})"
    for name, want in files.items():
        path = Path(ckpt_dir) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} differs from what was written (sha256)"
    return None


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds whose checkpoint dir (checkpoints/round-<N>) a run has, in order."""
    return sorted(int(p.name.split("-")[1]) for p in Path(run_dir).glob("checkpoints/round-*")
                  if p.is_dir() and p.name.split("-")[1].isdigit())


def read_state(path: Path) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(round, global payload, strategy state) of one round's state file."""
    with np.load(path) as z:
        payload = {k[len("global/"):]: z[k] for k in z.files if k.startswith("global/")}
        state = {k[len("state/"):]: z[k] for k in z.files if k.startswith("state/")}
        return int(z["round"]), payload, state


def latest_state(run_dir: Path) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(round, global payload, strategy state) of the last round a run checkpointed completely.

    A round whose files fail their manifest, or whose state file cannot be read, is skipped with
    a line naming it and why, for the round before it."""
    ckpts = Path(run_dir) / "checkpoints"
    rounds = [(r, ckpts / f"round-{r}" / STATE_FILE) for r in reversed(checkpoint_rounds(run_dir))
              if (ckpts / f"round-{r}" / STATE_FILE).is_file()]
    if not rounds:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoints/round-<N>/{STATE_FILE}; pass the run dir of a fedmllm run "
            "that finished at least one round"
        )
    problems = []
    for server_round, path in rounds:
        problem = check_round(path.parent)
        if problem is None:
            try:
                saved_round, payload, state = read_state(path)
                if saved_round != server_round:
                    raise ValueError(f"it says round {saved_round}")
                if not payload:
                    raise ValueError("it holds no adapter")
                return server_round, payload, state
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                problem = f"{STATE_FILE} unreadable ({type(err).__name__}: {err})"
        problems.append(f"round {server_round}: {problem}")
        print(f"checkpoints/round-{server_round} cannot be resumed from: {problem}; trying the round before",
              file=sys.stderr, flush=True)
    raise FileNotFoundError(f"{run_dir} has no intact checkpoint to resume from ({'; '.join(problems)})")


def prune_checkpoints(run_dir: Path, keep: int | None) -> list[int]:
    """Remove all but the newest `keep` rounds' checkpoint dirs (None: keep all); returns the
    rounds removed. The newest ones stay, so a resume or `fedmllm evaluate` still finds them."""
    if keep is None:
        return []
    rounds = checkpoint_rounds(run_dir)
    gone = rounds[: max(0, len(rounds) - int(keep))]
    for r in gone:
        shutil.rmtree(Path(run_dir) / "checkpoints" / f"round-{r}", ignore_errors=True)
    return gone
