"""Adagrad on the server over the averaged adapter update (Flower's FedAdagrad)."""

from __future__ import annotations

from fedmllm.algorithms.base import SERVER_OPTIMIZER_DP_REFUSAL, Algorithm, register


@register
class FedAdagrad(Algorithm):
    name = "fedadagrad"
    flower_strategy = "FedAdagrad"
    dp_refusal = SERVER_OPTIMIZER_DP_REFUSAL
