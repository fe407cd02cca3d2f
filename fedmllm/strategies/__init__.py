"""Adapter-only strategies; aggregate.py holds the pure math, validation.py the reply checks."""

from fedmllm.strategies.flower import (
    AdapterFedAdagrad,
    AdapterFedAdam,
    AdapterFedAvg,
    AdapterFedAvgM,
    AdapterFedProx,
    AdapterFedYogi,
)

__all__ = ["AdapterFedAdagrad", "AdapterFedAdam", "AdapterFedAvg", "AdapterFedAvgM", "AdapterFedProx", "AdapterFedYogi"]
from fedmllm.strategies.lora import AdapterFedSALoRA, AdapterFFALoRA, AdapterFLoRA, AdapterScaffold  # noqa: E402

__all__ += ["AdapterFedSALoRA", "AdapterFFALoRA", "AdapterFLoRA", "AdapterScaffold"]
