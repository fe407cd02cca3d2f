"""Yogi on the server over the averaged adapter update (Flower's FedYogi)."""

from __future__ import annotations

from fedmllm.algorithms.base import SERVER_OPTIMIZER_DP_REFUSAL, Algorithm, register


@register
class FedYogi(Algorithm):
    name = "fedyogi"
    flower_strategy = "FedYogi"
    dp_refusal = SERVER_OPTIMIZER_DP_REFUSAL
