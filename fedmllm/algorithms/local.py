"""FedMLLM's local-only baseline `local{k}`: partition `client.only` trains alone, every round,
from its own last adapter (FedAvg of one reply); the other partitions sit out once and are never
sampled again."""

from __future__ import annotations

from typing import Any

from fedmllm.algorithms.base import Algorithm, register


@register
class Local(Algorithm):
    name = "local"
    client_keys = ("adaptive_reg", "only")
    secure_refusal = "trains one partition alone: there is no sum to hide it in"
    dp_refusal = "trains one partition alone (centralized: every partition's samples pooled), with no mean over clients to hide one in"

    @property
    def only(self) -> int:
        return int(self.client.get("only", 0))

    def sits_out(self, partition_id: int) -> bool:
        return partition_id != self.only

    def problems(self, cfg: dict[str, Any]) -> list[str]:
        out = super().problems(cfg)
        only = self.client.get("only", 0)
        n = cfg["num_clients"]
        if not (isinstance(only, int) and not isinstance(only, bool) and 0 <= only < n):
            out.append(
                f"aggregator.client.only={only!r} must be a partition id in 0..{n - 1} "
                f"(num_clients={n}); sweep it with aggregator.client.only=0,1,..."
            )
        return out
