"""Adam on the server over the averaged adapter update (Flower's FedAdam)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedAdam(Algorithm):
    name = "fedadam"

    def strategy_class(self) -> type:
        from flwr.serverapp.strategy import FedAdam as Flower

        from fedmllm.strategies.validation import adapter_strategy

        return adapter_strategy(Flower)
