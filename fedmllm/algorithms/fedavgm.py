"""FedAvg with server momentum over the adapter (Flower's FedAvgM)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedAvgM(Algorithm):
    name = "fedavgm"

    def strategy_class(self) -> type:
        from flwr.serverapp.strategy import FedAvgM as Flower

        from fedmllm.strategies.validation import adapter_strategy

        return adapter_strategy(Flower)
