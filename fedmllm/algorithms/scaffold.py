"""SCAFFOLD (Karimireddy et al. 2020) over the adapter: the server control variate c travels down
with the adapter (record `scaffold-c`); each client corrects every gradient by c - c_k, keeps c_k
across rounds (its ClientStore) and sends dc_k (record `scaffold-dc`) up with its adapter y_k.
Server: x <- x + server_lr * avg_k(y_k - x),  c <- c + (|S|/N) mean_k(dc_k) (math in
fedmllm.strategies.aggregate)."""

from __future__ import annotations

import functools

import numpy as np

from fedmllm.algorithms.base import Algorithm, register
from fedmllm.strategies.aggregate import InvalidReply, scaffold_client_variate, scaffold_server_update


@register
class Scaffold(Algorithm):
    name = "scaffold"
    align = False
    secure_refusal = (
        "sends control-variate corrections (record dc) beside the adapter, which the masked sum does not carry"
    )
    dp_refusal = "sends its control-variate corrections (record dc) beside the adapter, unclipped and un-noised"
    stage_key = "scaffold"

    def strategy_class(self) -> type:
        return _strategy()

    def traffic(self, shared, total, own):
        return 2 * shared, 2 * shared  # the control variate has the adapter's size, each way

    def prepare(self, r) -> None:
        import torch

        super().prepare(r)
        c = r.extra.get("scaffold-c")
        if c is None:
            raise KeyError("aggregator=scaffold: the server's message has no 'scaffold-c' record")
        c_i = r.store.get("scaffold_c") or {k: np.zeros_like(v) for k, v in c.items()}
        trainable = {k: p for k, p in r.params.items() if p.requires_grad}
        r.scratch.update(
            c_i=c_i,
            grad_sum={},
            steps=0,
            correction={
                k: torch.from_numpy(np.asarray(c[k]) - c_i[k]).to(p.device, p.dtype) for k, p in trainable.items()
            },
        )

    def after_backward(self, r) -> None:
        grad_sum, correction = r.scratch["grad_sum"], r.scratch["correction"]
        for k, p in r.trainable.items():
            if p.grad is None:
                continue
            g = p.grad.detach()
            grad_sum[k] = grad_sum[k] + g if k in grad_sum else g.clone()
            p.grad.add_(correction[k])  # g + c - c_k
        r.scratch["steps"] += 1

    def finish(self, r, state):

        c_i = r.scratch["c_i"]
        grads = {k: v.float().cpu().numpy() for k, v in r.scratch["grad_sum"].items()}
        c_new = scaffold_client_variate(grads, max(r.scratch["steps"], 1))
        c_new = {k: c_new.get(k, c_i[k]) for k in c_i}
        r.store.put("scaffold_c", c_new)
        return state, {"scaffold-dc": {k: (c_new[k] - c_i[k]).astype(np.float32) for k in c_i}}


@functools.cache
def _strategy() -> type:
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.serverapp import Grid

    from fedmllm.records import from_record, to_record
    from fedmllm.strategies.fused import FusedAverage

    class ScaffoldStrategy(FusedAverage):
        """SCAFFOLD's server: sends c with the adapter, steps x and c from the replies."""

        state_attrs = ("server_c",)
        checks_values = False  # the control-variate step uses every reply's y_k: each is checked

        def __init__(self, server_learning_rate: float = 1.0, num_clients: int | None = None, **kwargs):
            super().__init__(**kwargs)
            self.server_learning_rate = float(server_learning_rate)
            self.num_clients = num_clients
            self.server_c: dict[str, np.ndarray] | None = None
            self.x: dict[str, np.ndarray] = {}  # the global adapter this round started from

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
            self.x = from_record(arrays)
            if self.server_c is None:
                self.server_c = {k: np.zeros_like(v) for k, v in self.x.items()}
            messages = list(super().configure_train(server_round, arrays, config, grid))
            c = to_record(self.server_c)
            for msg in messages:
                msg.content["scaffold-c"] = c
            return messages

        def check_extras(self, reference: dict, extras: dict) -> None:
            dc = extras.get("scaffold-dc")
            if dc is None:
                raise InvalidReply("no 'scaffold-dc' record: the client does not run aggregator=scaffold")
            for k, ref in reference.items():
                if k not in dc or np.shape(dc[k]) != np.shape(ref):
                    raise InvalidReply(f"scaffold-dc/{k}: missing or shaped {np.shape(dc.get(k))} != {np.shape(ref)}")

        def aggregate_train(self, server_round: int, replies):
            valid: list[Message] = list(replies)
            x = self.x
            ys = [from_record(m.content[self.arrayrecord_key]) for m in valid]
            dcs = [from_record(m.content["scaffold-dc"]) for m in valid]
            weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid]
            new_x, self.server_c = scaffold_server_update(
                x,
                self.server_c,
                [{k: y[k] - x[k] for k in x} for y in ys],
                dcs,
                weights,
                max(self.num_clients or len(ys), len(ys)),
                self.server_learning_rate,
            )
            return to_record(new_x), self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)

    return ScaffoldStrategy
