"""HF config.json files of the hub presets, bundled so the models can be built on the meta device
offline (`fedmllm inspect`); transcribed from the checkpoints' own config.json on the Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def bundled_config(model_cfg: dict[str, Any]):
    """The transformers config of a preset with `hf_config: <name>.json` (a file in this folder)."""
    from transformers import AutoConfig

    name = model_cfg.get("hf_config")
    path = HERE / str(name)
    if not name or not path.is_file():
        known = sorted(p.name for p in HERE.glob("*.json"))
        raise FileNotFoundError(
            f"model preset {model_cfg.get('name')!r} has hf_config={name!r}, not one of the bundled configs {known}"
        )
    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def meta_model(model_cfg: dict[str, Any]):
    """The preset's model on the meta device (shapes only, no memory, no download)."""
    import torch

    from fedmllm.models.registry import get_family

    config = bundled_config(model_cfg)
    with torch.device("meta"):
        return get_family(model_cfg["family"]).model_cls()(config)
