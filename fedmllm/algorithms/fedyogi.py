"""Yogi on the server over the averaged adapter update (Flower's FedYogi)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedYogi(Algorithm):
    name = "fedyogi"

    def strategy_class(self) -> type:
        from flwr.serverapp.strategy import FedYogi as Flower

        from fedmllm.strategies.validation import adapter_strategy

        return adapter_strategy(Flower)
