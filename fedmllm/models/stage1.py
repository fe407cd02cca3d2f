"""Where a server stage-1 result (vision tower + projector weights) lives, and loading it.

The server trains these weights once per (base model, stage settings, public pool) and caches
them like a model build; clients and the server compute the same cache path from the same
config and load the weights into the base model before PEFT wraps it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STAGE1_VERSION = 1  # bump when the stage-1 trainer changes what it produces
WEIGHTS = "stage1.safetensors"
SUMMARY = "summary.json"


def stage1_dir(cfg: dict[str, Any]) -> Path | None:
    """Cache directory of the stage-1 result the config asks for, or None (no pretraining)."""
    from fedmllm.models.build import cache_root, preset_dir

    stage = (cfg.get("server_stage") or {}).get("pretrain") or {}
    if not stage.get("enabled", False):
        return None
    model = cfg["model"]
    base = model.get("path") or preset_dir(model).name  # the build's own key
    ds = cfg["dataset"]
    key = json.dumps(
        {
            "v": STAGE1_VERSION,
            "base": base,
            "stage": {k: v for k, v in stage.items() if k != "enabled"},
            "public": {"name": ds["name"], "public_fraction": ds.get("public_fraction"), "seed": cfg["seed"]},
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_root() / "stage1" / f"{model['name']}-{digest}"


def model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model preset config, with `stage1_weights` set when the run uses a stage-1 base."""
    model = dict(cfg["model"])
    out = stage1_dir(cfg)
    if out is not None:
        model["stage1_weights"] = str(out / WEIGHTS)
    return model


def load_stage1(model, path: str | Path) -> None:
    """Load stage-1 weights (vision tower + projector keys of the base model) into `model`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"stage-1 weights {path} are missing on this node. The server builds them before round 1 "
            "(server_stage.pretrain); in a deployment copy that directory from the server's "
            "$FEDMLLM_CACHE, or run with server_stage=none"
        )
    state = load_file(str(path))
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"stage-1 weights {path} do not fit this model (first mismatches: {bad[:3]})")
    model.load_state_dict(state, strict=False)
