"""Model families, loading, 4-bit quantization, offline builders, PEFT and the adapter payload."""

from __future__ import annotations

import json
import threading
from typing import Any, NamedTuple

import fedmllm.models.families  # noqa: F401  (registers every family; registry.families() lists them)
from fedmllm.models.adapter import apply_peft
from fedmllm.models.load import load_model
from fedmllm.models.registry import Family, get_family, register_family  # noqa: F401


class LoadedModel(NamedTuple):
    model: Any  # a PeftModel
    processor: Any
    family: Family


# Per-process cache: a simulation worker or SuperNode process loads the model once and reuses it
# every round (each round only swaps adapter weights). Keyed by the model + peft config, so
# different sweep jobs in one process never share a model by accident.
_CACHE: dict[str, LoadedModel] = {}
_LOCK = threading.Lock()


def get_model(model_cfg: dict[str, Any], peft_cfg: dict[str, Any]) -> LoadedModel:
    """Load (once per process and config) the base model with the adapter attached."""
    key = json.dumps([model_cfg, peft_cfg], sort_keys=True, default=str)
    with _LOCK:
        if key not in _CACHE:
            model, processor, family = load_model(model_cfg)
            _CACHE.clear()  # one model per process: memory beats a second cached preset
            _CACHE[key] = LoadedModel(apply_peft(model, family, peft_cfg), processor, family)
        return _CACHE[key]


def clear_cache() -> None:
    """Drop cached models (tests, or a sweep switching presets)."""
    with _LOCK:
        _CACHE.clear()
