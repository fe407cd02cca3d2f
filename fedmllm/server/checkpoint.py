"""PEFT-format checkpoints: adapter_model.safetensors + adapter_config.json per round."""

from __future__ import annotations

import shutil
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


def latest_state(run_dir: Path) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(round, global payload, strategy state) of the last round a run checkpointed completely."""
    rounds = sorted(
        (int(p.parent.name.split("-")[1]), p)
        for p in Path(run_dir).glob(f"checkpoints/round-*/{STATE_FILE}")
        if p.parent.name.split("-")[1].isdigit()
    )
    if not rounds:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoints/round-<N>/{STATE_FILE}; pass the run dir of a fedmllm run "
            "that finished at least one round"
        )
    server_round, path = rounds[-1]
    with np.load(path) as z:
        payload = {k[len("global/"):]: z[k] for k in z.files if k.startswith("global/")}
        state = {k[len("state/"):]: z[k] for k in z.files if k.startswith("state/")}
        assert int(z["round"]) == server_round, f"{path}: round {int(z['round'])} != {server_round}"
    return server_round, payload, state
