"""FedAvg over the adapter: the weighted average of the clients' adapters (weights: num-examples)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedAvg(Algorithm):
    name = "fedavg"
