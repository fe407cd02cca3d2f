"""What travels for each aggregator, shared by client and server (no flwr, no torch).

Every aggregator config has a `client:` section naming the client algorithm:
- `standard`: the whole adapter travels both ways (FedAvg, FedAvgM, FedProx, FedAdam, ...).
- `scaffold`: the adapter plus control variates (server c down, client dc up).
- `ffa_lora`: LoRA A is frozen at a seed-derived init shared by all; only B (+ projector) travels.
- `fedsa_lora`: only A (+ projector) is shared and aggregated; each client keeps its own B.
- `flora`: clients train a fresh rank-r_k LoRA on top of the global update and send it; the server
  stacks them (exact sum of B_k A_k) and keeps the global update at rank `max_rank`.
`adaptive_reg: true` adds FedMLLM's layer-wise proximal term on the client for any algorithm.
`only: k` trains partition k alone (the others sit out: FedMLLM's `local{k}` baseline, aggregator=local);
with `pooled: true` partition k trains on every partition's samples together (aggregator=centralized).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from fedmllm.strategies.aggregate import lora_role

ALGORITHMS = ("standard", "scaffold", "ffa_lora", "fedsa_lora", "flora")


@dataclass(frozen=True)
class ClientSpec:
    algorithm: str = "standard"
    adaptive_reg: bool = False
    ranks: tuple[int, ...] = ()  # flora: LoRA rank per partition (cycled) when node_config has no lora-rank
    max_rank: int = 64  # flora: rank bound of the global update
    only: int | None = None  # local / centralized baselines: the one partition that trains
    pooled: bool = False  # centralized: that partition trains on the union of all partitions

    def sits_out(self, partition_id: int) -> bool:
        """Whether this partition has nothing to do in the run (it replies num-examples 0 once and
        the strategy never samples it again)."""
        return self.only is not None and partition_id != self.only


def client_spec(cfg: dict[str, Any]) -> ClientSpec:
    raw = dict(cfg["aggregator"].get("client") or {})
    algo = raw.get("algorithm", "standard")
    if algo not in ALGORITHMS:
        raise ValueError(f"aggregator.client.algorithm={algo!r}: choose one of {list(ALGORITHMS)}")
    return ClientSpec(
        algorithm=algo,
        adaptive_reg=bool(raw.get("adaptive_reg", False)),
        ranks=tuple(int(r) for r in raw.get("ranks") or ()),
        max_rank=int(raw.get("max_rank", 64)),
        only=None if raw.get("only") is None else int(raw["only"]),
        pooled=bool(raw.get("pooled", False)),
    )


def adaptive_reg_settings(cfg: dict[str, Any]) -> dict[str, float] | None:
    """FedMLLM's adaptive regularization settings when on (train.adaptive_reg.enabled or the
    aggregator's client section), else None."""
    reg = dict(cfg["train"].get("adaptive_reg") or {})
    if not (reg.get("enabled") or client_spec(cfg).adaptive_reg):
        return None
    return {"mu": float(reg.get("mu", 0.01)), "mu_w": float(reg.get("mu_w", 0.1)), "s_layer": int(reg.get("s_layer", 4))}


def travels(algorithm: str, key: str) -> bool:
    """Whether an adapter tensor is part of the exchanged payload under `algorithm`."""
    role = lora_role(key)
    if algorithm == "ffa_lora":
        return role != "A"
    if algorithm == "fedsa_lora":
        return role != "B"
    return True


def shared_payload(algorithm: str, arrays: dict) -> dict:
    return {k: v for k, v in arrays.items() if travels(algorithm, k)}


def client_rank(cfg: dict[str, Any], partition_id: int, node_rank: int | None = None) -> int:
    """A client's own LoRA rank: node_config `lora-rank`, else `aggregator.client.ranks` (cycled
    over partition ids), else `peft.r` (0 for peft=ia3, which has no rank)."""
    if node_rank is not None:
        return int(node_rank)
    ranks = client_spec(cfg).ranks
    return ranks[partition_id % len(ranks)] if ranks else int(cfg["peft"].get("r", 0))


def peft_for(cfg: dict[str, Any], rank: int | None = None) -> dict[str, Any]:
    """The PEFT settings of a model under this aggregator.

    flora: the server's model holds the global update at rank `max_rank`; a client's model holds
    it plus its own rank-`rank` factors (rank max_rank + rank). lora_alpha follows the rank so the
    scale (alpha/r, rsLoRA: alpha/sqrt(r)) stays that of `peft.alpha` and `peft.r` for every rank.
    IA3 has no rank: its section is returned as is.
    """
    peft = dict(cfg["peft"])
    if peft.get("name", "lora") == "ia3":
        if rank is not None:
            raise ValueError(f"client LoRA rank {rank}: peft=ia3 has no rank; drop node_config lora-rank")
        return peft
    root = 0.5 if peft.get("name") == "rslora" else 1.0  # the power of r in the scale's denominator
    scale = float(peft.get("alpha", 32)) / float(peft["r"]) ** root
    spec = client_spec(cfg)
    r = int(peft["r"])
    if spec.algorithm == "flora":
        r = spec.max_rank + (int(rank) if rank is not None else 0)
    elif rank is not None and int(rank) != r:
        raise ValueError(
            f"client LoRA rank {rank} != peft.r={r}: heterogeneous ranks need aggregator=flora "
            "(other aggregators average tensors of one shape)"
        )
    peft["r"], peft["alpha"] = r, scale * r**root
    return peft


def split_rank(keys: Iterable[str]) -> list[str]:
    """LoRA keys (A and B) among `keys`: the tensors whose shape depends on the rank."""
    return [k for k in keys if lora_role(k) != "other"]
