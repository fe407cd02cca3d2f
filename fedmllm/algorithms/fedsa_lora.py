"""FedSA-LoRA: only A (and the projector) is shared and averaged; each client keeps its own B
across rounds (its ClientStore, from zero). Clients also upload B in record `lora-b`, used only to
complete the adapter for the server's centralized evaluation (its average is never sent back)."""

from __future__ import annotations

import functools

import numpy as np

from fedmllm.algorithms.base import Algorithm, register
from fedmllm.models.adapter import load_adapter_state
from fedmllm.strategies.aggregate import InvalidReply, lora_role, weighted_average


@register
class FedSALoRA(Algorithm):
    name = "fedsa_lora"
    peft_methods = ("lora", "dora", "rslora")
    adapter_stage = False  # each client's B starts local from zero: a pre-trained B would not reach them
    align = False
    stage_key = "fedsa_lora"
    dp_refusal = "uploads each client's B (record lora-b) beside the shared A, unclipped and un-noised"

    def travels(self, key: str) -> bool:
        return lora_role(key) != "B"

    def traffic(self, shared, total, own):
        return total, shared  # B goes up too, for the server's evaluation

    def strategy_class(self) -> type:
        return _strategy()

    def prepare(self, r) -> None:

        own_b = r.store.get("lora_b") or {
            k: np.zeros(tuple(p.shape), np.float32) for k, p in r.params.items() if lora_role(k) == "B"
        }
        load_adapter_state(r.model, {**r.arrays, **own_b})

    def finish(self, r, state):
        own_b = {k: v for k, v in state.items() if lora_role(k) == "B"}
        r.store.put("lora_b", own_b)
        return state, {"lora-b": own_b}  # for the server's centralized evaluation only; never sent back


@functools.cache
def _strategy() -> type:
    from fedmllm.records import from_record
    from fedmllm.strategies.fused import FusedAverage

    class FedSALoRAStrategy(FusedAverage):
        """Averages the shared A; keeps the average of the clients' B for evaluation (`fixed`)."""

        state_attrs = ()

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.fixed: dict = {}  # the clients' average B: completes the global adapter, never sent

        def check_extras(self, reference: dict, extras: dict) -> None:
            if "lora-b" not in extras:
                raise InvalidReply("no 'lora-b' record: the client does not run aggregator=fedsa_lora")

        def aggregate_train(self, server_round: int, replies):
            valid = list(replies)
            weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid]
            self.fixed = weighted_average([from_record(m.content["lora-b"]) for m in valid], weights)
            return super().aggregate_train(server_round, valid)

    return FedSALoRAStrategy
