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
