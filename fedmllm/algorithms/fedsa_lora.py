"""FedSA-LoRA (Guo et al., 2025): only A (and the projector) is shared and averaged; each client
keeps its own B across rounds (its ClientStore, from zero) and never sends it. A client's personal
model is the global A + its own B: client-side evaluation (eval.client_fraction) evaluates it on
the client's held-out split, as the authors do, and the client saves it in PEFT format. The
server's centralized evaluation sees the global A with the initial B (zero for LoRA): what the
federation shares, without any client's B."""

from __future__ import annotations

import numpy as np

from fedmllm.algorithms.base import Algorithm, register
from fedmllm.models.adapter import load_adapter_state
from fedmllm.strategies.aggregate import lora_role


@register
class FedSALoRA(Algorithm):
    name = "fedsa_lora"
    peft_methods = ("lora", "dora", "rslora")
    adapter_stage = False  # each client's B starts local from zero: a pre-trained B would not reach them
    align = False
    stage_key = "fedsa_lora"
    personal = True

    def travels(self, key: str) -> bool:
        return lora_role(key) != "B"

    def prepare(self, r) -> None:
        own_b = r.store.get("lora_b") or {
            k: np.zeros(tuple(p.shape), np.float32) for k, p in r.params.items() if lora_role(k) == "B"
        }
        load_adapter_state(r.model, {**r.arrays, **own_b})

    def evaluation_model(self, r) -> None:
        self.prepare(r)  # the global A + this client's own B

    def finish(self, r, state):
        r.store.put("lora_b", {k: v for k, v in state.items() if lora_role(k) == "B"})
        return state, {}
