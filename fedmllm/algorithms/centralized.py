"""The centralized baseline: one trainer on the union of every partition (each sample keeps its
partition's modality scenario), `clients_per_round` times the local steps per round, so it sees
as many samples per round as the federation."""

from __future__ import annotations

from fedmllm.algorithms.base import register
from fedmllm.algorithms.local import Local


@register
class Centralized(Local):
    name = "centralized"

    @property
    def pooled(self) -> bool:
        return True
