"""Adagrad on the server over the averaged adapter update (Flower's FedAdagrad)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedAdagrad(Algorithm):
    name = "fedadagrad"

    def strategy_class(self) -> type:
        from flwr.serverapp.strategy import FedAdagrad as Flower

        from fedmllm.strategies.validation import adapter_strategy

        return adapter_strategy(Flower)
