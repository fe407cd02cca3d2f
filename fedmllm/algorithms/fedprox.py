"""FedProx: FedAvg aggregation; Flower's FedProx sends `proximal-mu` and each client adds
(mu/2)||theta - theta_global||^2 over the adapter tensors it trains (fedmllm.client.local)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedProx(Algorithm):
    name = "fedprox"
    flower_strategy = "FedProx"
