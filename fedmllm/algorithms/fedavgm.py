"""FedAvg with server momentum over the adapter (Flower's FedAvgM)."""

from __future__ import annotations

from fedmllm.algorithms.base import SERVER_OPTIMIZER_DP_REFUSAL, Algorithm, register


@register
class FedAvgM(Algorithm):
    name = "fedavgm"
    flower_strategy = "FedAvgM"
    dp_refusal = SERVER_OPTIMIZER_DP_REFUSAL
