"""Adapter-only strategies; aggregate.py holds the pure math, validation.py the reply checks.

The Flower strategy classes load on first use (PEP 562), so the pure modules (`protocol`,
`aggregate`) import without flwr: the server stages and training code use them where flwr is
not installed (bench/gpu.py on a GPU machine).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "AdapterFedAdagrad": "flower", "AdapterFedAdam": "flower", "AdapterFedAvg": "flower",
    "AdapterFedAvgM": "flower", "AdapterFedProx": "flower", "AdapterFedYogi": "flower",
    "AdapterFedSALoRA": "lora", "AdapterFFALoRA": "lora", "AdapterFLoRA": "lora", "AdapterScaffold": "lora",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedmllm.strategies.{_WHERE[name]}"), name)
