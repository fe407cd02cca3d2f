"""Adam on the server over the averaged adapter update (Flower's FedAdam)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedAdam(Algorithm):
    name = "fedadam"
    flower_strategy = "FedAdam"
