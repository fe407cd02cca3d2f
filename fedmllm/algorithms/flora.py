"""FLoRA: each client trains a fresh rank-r_k LoRA on top of the global update and sends it; the
server stacks them (B_s A_s = sum_k p_k B_k A_k exactly, any ranks) and folds the stack into the
global update, kept at rank `max_rank` by truncated SVD (exact while the accumulated update has
rank <= max_rank). The projector is averaged (FedAvg).

Client settings: `ranks` (partition i trains rank ranks[i % len]; empty: peft.r; node_config
`lora-rank` wins) and `max_rank` (the global update's rank)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from fedmllm.algorithms.base import Algorithm, peft_at_rank, register
from fedmllm.models.adapter import init_lora_a, load_adapter_state
from fedmllm.strategies.aggregate import flora_merge, flora_stack, lora_pairs, lora_role


@register
class FLoRA(Algorithm):
    name = "flora"
    client_keys = ("adaptive_reg", "ranks", "max_rank")
    # FLoRA sums B_k A_k across clients, which DoRA's column normalisation ||W + s BA|| does not allow.
    peft_methods = ("lora", "rslora")
    align = False
    free_rank = True
    stage_key = "flora"
    secure_refusal = "stacks each client's own LoRA factors, which needs them one by one"
    dp_refusal = (
        "stacks each client's own LoRA factors into the global adapter, where one client's update is whole, "
        "not a clipped share of a mean"
    )

    @property
    def max_rank(self) -> int:
        return int(self.client.get("max_rank", 64))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self.client.get("ranks") or ())

    def problems(self, cfg: dict[str, Any]) -> list[str]:
        out = super().problems(cfg)
        ranks = list(self.client.get("ranks") or [])
        if not all(isinstance(r, int) and r >= 1 for r in ranks):
            out.append(f"aggregator.client.ranks={ranks!r} must be integers >= 1 (e.g. [8,16])")
        elif not (isinstance(self.client.get("max_rank"), int) and self.client["max_rank"] >= max(ranks + [1])):
            out.append(
                f"aggregator.client.max_rank={self.client.get('max_rank')!r} must be an integer >= every client rank"
            )
        return out

    def client_rank(self, cfg, partition_id, node_rank=None) -> int:
        """node_config `lora-rank`, else `client.ranks` cycled over partition ids, else peft.r."""
        if node_rank is not None:
            return int(node_rank)
        return self.ranks[partition_id % len(self.ranks)] if self.ranks else super().client_rank(cfg, partition_id)

    def client_peft(self, cfg, partition_id, node_rank=None) -> dict[str, Any]:
        """The client's model holds the global update (rank max_rank, frozen) plus its own factors."""
        return peft_at_rank(cfg["peft"], self.max_rank + self.client_rank(cfg, partition_id, node_rank))

    def server_peft(self, cfg) -> dict[str, Any]:
        return peft_at_rank(cfg["peft"], self.max_rank)

    def traffic(self, shared, total, own):
        return own(), shared  # up: the client's own rank-r factors; down: the rank-max_rank update

    def strategy_class(self) -> type:
        return _strategy()

    def prepare(self, r) -> None:
        """Model rank = R (global update, frozen) + r (this round's fresh local factors)."""
        import torch

        rank = self.max_rank
        params = r.params
        init_lora_a(r.model, r.round_seed)  # fresh local A; B starts at zero as in PEFT
        full = {}
        for a_key, b_key in lora_pairs(params).values():
            a, b = params[a_key], params[b_key]
            ga, gb = np.asarray(r.arrays[a_key]), np.asarray(r.arrays[b_key])
            if ga.shape[0] != rank or a.shape[0] <= rank:
                raise ValueError(
                    f"{a_key}: global rank {ga.shape[0]} / model rank {a.shape[0]} do not fit max_rank={rank}"
                )
            new_a = a.detach().cpu().float().numpy().copy()
            new_a[:rank] = ga
            new_b = np.zeros(tuple(b.shape), np.float32)
            new_b[:, :rank] = gb
            full[a_key], full[b_key] = new_a, new_b
            mask_a = torch.ones_like(a)
            mask_a[:rank] = 0
            mask_b = torch.ones_like(b)
            mask_b[:, :rank] = 0
            r.hooks += [a.register_hook(lambda g, m=mask_a: g * m), b.register_hook(lambda g, m=mask_b: g * m)]
        others = {k: v for k, v in r.arrays.items() if lora_role(k) == "other"}
        load_adapter_state(r.model, {**full, **others})

    def finish(self, r, state):
        rank = self.max_rank
        for k in list(state):
            if lora_role(k) == "A":
                state[k] = state[k][rank:].copy()
            elif lora_role(k) == "B":
                state[k] = state[k][:, rank:].copy()
        return state, {}


@functools.cache
def _strategy() -> type:
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp import Grid

    from fedmllm.records import from_record, to_record
    from fedmllm.strategies.fused import FusedAverage

    class FLoRAStrategy(FusedAverage):
        """Stacks the clients' factors and folds them into the rank-max_rank global update; reports
        the fold's truncation error as the metric `flora_truncation_error`."""

        state_attrs = ()
        checks_values = False  # stacking, not averaging: each reply is checked

        def __init__(self, max_rank: int = 64, **kwargs):
            super().__init__(**kwargs)
            self.max_rank = int(max_rank)
            self.reference: dict = {}  # the global update this round started from

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
            self.reference = from_record(arrays)
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies):
            valid = list(replies)
            payloads = [from_record(m.content[self.arrayrecord_key]) for m in valid]
            weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid]
            merged, error = flora_merge(self.reference, flora_stack(payloads, weights), self.max_rank)
            metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
            metrics["flora_truncation_error"] = float(error)
            return to_record(merged), metrics

    return FLoRAStrategy
