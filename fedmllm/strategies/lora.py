"""SCAFFOLD and the LoRA-aware aggregators, on Flower's FedAvg round loop (math in aggregate.py)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import strategy as fl

from fedmllm.records import to_record
from fedmllm.strategies.aggregate import (
    InvalidReply,
    flora_merge,
    flora_stack,
    scaffold_server_update,
    weighted_average,
)
from fedmllm.strategies.validation import AdapterReplies, FusedAverage, ValidReplies


class AdapterScaffold(AdapterReplies, FusedAverage):
    """SCAFFOLD over the adapter: the server control variate c travels down with the adapter
    (record `scaffold-c`), each client corrects its gradients by c - c_k, keeps c_k across rounds
    and sends dc_k (record `scaffold-dc`) up with its adapter y_k. Server:
    x <- x + server_lr * avg_k(y_k - x),  c <- c + (|S|/N) mean_k(dc_k)."""

    state_attrs = ("server_c",)
    fused_average = False  # check finiteness per reply: the control-variate step uses every reply's y_k

    def __init__(self, server_learning_rate: float = 1.0, num_clients: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.server_learning_rate = float(server_learning_rate)
        self.num_clients = num_clients
        self.server_c: dict[str, np.ndarray] | None = None

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord]:
        if self.server_c is None:
            self.server_c = {k: np.zeros_like(v) for k, v in self._reference.items()}
        return {"scaffold-c": to_record(self.server_c)}

    def check_extra(self, extra: dict) -> None:
        super().check_extra(extra)
        dc = extra.get("scaffold-dc")
        if dc is None:
            raise InvalidReply("no 'scaffold-dc' record: the client does not run aggregator=scaffold")
        for k, ref in (self._reference or {}).items():
            if k not in dc or np.shape(dc[k]) != np.shape(ref):
                raise InvalidReply(f"scaffold-dc/{k}: missing or shaped {np.shape(dc.get(k))} != {np.shape(ref)}")

    def aggregate_replies(self, server_round: int, valid: list[Message], decoded: ValidReplies):
        x, ys = self._reference, decoded.payloads  # x: the global adapter this round started from
        new_x, self.server_c = scaffold_server_update(
            x, self.server_c, [{k: y[k] - x[k] for k in x} for y in ys], [e["scaffold-dc"] for e in decoded.extras],
            decoded.weights, max(self.num_clients or len(ys), len(ys)), self.server_learning_rate)
        return to_record(new_x), self.train_metrics(valid)


class AdapterFFALoRA(AdapterReplies, FusedAverage):
    """FFA-LoRA: A stays at the shared seed-derived init on every client (never sent); only B and
    the projector travel, so FedAvg of B is exact: avg_k(B_k) A = avg_k(B_k A)."""


class AdapterFedSALoRA(AdapterReplies, FusedAverage):
    """FedSA-LoRA: only A (and the projector) is shared and averaged; each client keeps its own B
    across rounds. Clients also upload B in record `lora-b`, used only to complete the adapter for
    the server's centralized evaluation (its average is never sent back)."""

    state_attrs = ()

    def check_extra(self, extra: dict) -> None:
        super().check_extra(extra)
        if "lora-b" not in extra:
            raise InvalidReply("no 'lora-b' record: the client does not run aggregator=fedsa_lora")

    def aggregate_replies(self, server_round: int, valid: list[Message], decoded: ValidReplies):
        self.fixed = weighted_average([e["lora-b"] for e in decoded.extras], decoded.weights)
        return super().aggregate_replies(server_round, valid, decoded)


class AdapterFLoRA(AdapterReplies, fl.FedAvg):
    """FLoRA: clients train fresh rank-r_k factors on top of the global update; the server stacks
    them (B_s A_s = sum_k p_k B_k A_k exactly, any ranks) and folds the stack into the global update,
    kept at rank `max_rank` by truncated SVD (exact while the accumulated update has rank <= max_rank).
    The projector is averaged (FedAvg)."""

    free_rank = True

    def __init__(self, max_rank: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.max_rank = int(max_rank)
        self.truncation_error = 0.0

    def aggregate_replies(self, server_round: int, valid: list[Message], decoded: ValidReplies):
        stacked = flora_stack(decoded.payloads, decoded.weights)
        merged, self.truncation_error = flora_merge(self._reference, stacked, self.max_rank)
        self.round_stats["flora_truncation_error"] = self.truncation_error
        return to_record(merged), self.train_metrics(valid)
