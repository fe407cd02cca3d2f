"""Where the server stages' results live: the stage-1 weights (vision tower + projector) and the
pre-trained initial adapter, each cached under a key of everything that shapes it. The server
builds them once; clients and the server compute the same paths from the same config (clients
load the stage-1 weights into the base model before PEFT wraps it: `model_config`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedmllm.algorithms import algorithm_of
from fedmllm.common import cache_root
from fedmllm.models.build import preset_dir

STAGE1_VERSION = 1  # bump when the stage-1 trainer changes what it produces
WEIGHTS = "stage1.safetensors"
SUMMARY = "summary.json"
ADAPTER_VERSION = 1  # bump when the adapter pre-training changes what it produces
ADAPTER = "adapter.safetensors"


def stage1_dir(cfg: dict[str, Any]) -> Path | None:
    """Cache directory of the stage-1 result the config asks for, or None (no pretraining)."""

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
            "stage": {k: v for k, v in stage.items() if k not in ("enabled", "lora")},
            "public": {"name": ds["name"], "public_fraction": ds.get("public_fraction"), "seed": cfg["seed"]},
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_root() / "stage1" / f"{model['name']}-{digest}"


def adapter_dir(cfg: dict[str, Any]) -> Path | None:
    """Cache directory of the pre-trained initial adapter (`server_stage.pretrain.lora`), or None.

    Keyed by everything that shapes it: the stage-1 result it trains on, its own settings, the
    PEFT settings and aggregator algorithm (FFA-LoRA freezes A), the model preset (quantization
    included), the task (dataset, template, prompt) and the seed."""

    base = stage1_dir(cfg)
    lora = ((cfg.get("server_stage") or {}).get("pretrain") or {}).get("lora") or {}
    if base is None or not lora.get("enabled", False):
        return None
    algorithm = algorithm_of(cfg)
    key = json.dumps(
        {
            "v": ADAPTER_VERSION,
            "stage1": base.name,
            "lora": {k: v for k, v in lora.items() if k != "enabled"},
            "peft": algorithm.server_peft(cfg),
            "algorithm": algorithm.stage_key,
            "model": cfg["model"],
            "dataset": {k: v for k, v in cfg["dataset"].items() if k != "eval_samples"},
            "prompt": cfg.get("prompt"),
            "train": {k: cfg["train"].get(k) for k in ("projector_lr", "weight_decay", "max_grad_norm")},
            "seed": cfg["seed"],
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_root() / "pretrain-lora" / f"{cfg['model']['name']}-{digest}"


def model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model preset config, with `stage1_weights` set when the run uses a stage-1 base."""
    model = dict(cfg["model"])
    out = stage1_dir(cfg)
    if out is not None:
        model["stage1_weights"] = str(out / WEIGHTS)
    return model


def _result(summary: dict[str, Any], out: Path, cached: bool) -> dict[str, Any]:
    """A server stage's summary as a run records it: `build_seconds` what building it took,
    `seconds` what this run spent on it (0 when it came from the cache)."""
    return {
        **summary,
        "cached": cached,
        "build_seconds": summary["seconds"],
        "seconds": 0.0 if cached else summary["seconds"],
        "dir": str(out),
    }
