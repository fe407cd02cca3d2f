"""FedAvg over the adapter: the weighted average of the clients' adapters (weights: num-examples)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedAvg(Algorithm):
    name = "fedavg"

    def strategy_class(self) -> type:
        from flwr.serverapp.strategy import FedAvg as Flower

        from fedmllm.strategies.validation import adapter_strategy

        return adapter_strategy(Flower)
