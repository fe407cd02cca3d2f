"""FFA-LoRA: LoRA A stays at a seed-derived init shared by every process (never sent); only B
and the projector travel and train, so FedAvg of B is exact: avg_k(B_k) A = avg_k(B_k A)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register
from fedmllm.models.adapter import init_lora_a, load_adapter_state
from fedmllm.strategies.aggregate import lora_role


@register
class FFALoRA(Algorithm):
    name = "ffa_lora"
    # DoRA's magnitude vector travels with B (role "other", averaged), which frozen-A FedAvg allows.
    peft_methods = ("lora", "dora", "rslora")
    align = False
    stage_key = "ffa_lora"

    def travels(self, key: str) -> bool:
        return lora_role(key) != "A"

    def prepare_server_model(self, model, seed: int) -> None:

        init_lora_a(model, seed)  # the frozen A every client derives from the same seed

    def frozen_in_adapter_stage(self, key: str) -> bool:
        return lora_role(key) == "A"  # the clients' A is derived from the seed and frozen: train B only

    def evaluation_model(self, r) -> None:
        self.prepare(r)  # the seed's A + the global B

    def prepare(self, r) -> None:

        init_lora_a(r.model, r.seed)  # the same A in every process: derived from the run seed
        for k, p in r.params.items():
            if lora_role(k) == "A":
                p.requires_grad_(False)
        load_adapter_state(r.model, r.arrays, partial=True)
