"""Adam on the server over the averaged adapter update (Flower's FedAdam)."""

from __future__ import annotations

from fedmllm.algorithms.base import SERVER_OPTIMIZER_DP_REFUSAL, Algorithm, register


@register
class FedAdam(Algorithm):
    name = "fedadam"
    flower_strategy = "FedAdam"
    dp_refusal = SERVER_OPTIMIZER_DP_REFUSAL
