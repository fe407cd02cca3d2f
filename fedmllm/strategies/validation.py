"""Reply validation and payload accounting, mixed into Flower's strategies (the round loop stays theirs)."""

from __future__ import annotations

from logging import WARNING
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmllm.strategies.aggregate import InvalidReply, check_reply


class AdapterReplies:
    """Mixin for a Flower strategy: replies are checked against the global adapter before aggregation.

    A bad reply (other keys or shapes, non-finite values, num-examples <= 0) is dropped with
    its reason logged; the round fails only if fewer than `min_train_nodes` valid replies remain.
    `round_stats` holds bytes down/up and per-client bytes of the last round, for logging.
    `post_aggregate(server_round, arrays) -> (arrays, stats)`, when set, transforms the aggregate
    before it becomes the global adapter (the server's global alignment); its stats join round_stats.
    """

    post_aggregate = None

    def __init__(self, **kwargs):
        kwargs.setdefault("fraction_evaluate", 0.0)  # evaluation is centralized on the server
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self._reference: dict | None = None
        self.round_stats: dict = {}
        self.dropped: list[tuple[int, str]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        down = sum(v.numpy().nbytes for v in arrays.values())
        self.round_stats = {"bytes_down": down * len(messages), "bytes_down_per_client": down}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[Message] = []
        per_client: dict[int, int] = {}
        for msg in replies:
            if msg.has_error():
                valid.append(msg)  # Flower's own check logs and drops it
                continue
            try:
                arrays = {k: v.numpy() for k, v in msg.content[self.arrayrecord_key].items()}
                metrics = next(iter(msg.content.metric_records.values()), {})
                check_reply(self._reference or arrays, arrays, metrics.get(self.weighted_by_key))
            except (InvalidReply, KeyError, StopIteration) as err:
                log(WARNING, "round %s: dropped reply from node %s: %s", server_round, msg.metadata.src_node_id, err)
                self.dropped.append((server_round, str(err)))
                continue
            per_client[int(metrics.get("partition-id", msg.metadata.src_node_id))] = sum(
                a.nbytes for a in arrays.values()
            )
            valid.append(msg)
        ok = [m for m in valid if not m.has_error()]
        if len(ok) < self.min_train_nodes:
            log(WARNING, "round %s: %d valid replies < min_train_nodes=%d; no aggregation",
                server_round, len(ok), self.min_train_nodes)
            self.round_stats.update(bytes_up=sum(per_client.values()), bytes_up_per_client=per_client)
            return None, None
        self.round_stats.update(bytes_up=sum(per_client.values()), bytes_up_per_client=per_client)
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None and "train-loss" in metrics:
            self.round_stats["train_loss"] = float(metrics["train-loss"])
        if arrays is not None and self.post_aggregate is not None:
            arrays = self._post_aggregate(server_round, arrays)
        return arrays, metrics

    def _post_aggregate(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        from fedmllm.records import from_record, to_record

        new, stats = self.post_aggregate(server_round, from_record(arrays))
        if new is None:
            return arrays
        self.round_stats.update(stats)
        record = to_record(new)
        # Strategies with server state keep their own copy of the global adapter (FedAvgM: an
        # ArrayRecord; FedOpt: numpy dicts): it must be the aligned one, or the next round's
        # pseudo-gradient is taken against a model no client received.
        current = getattr(self, "current_arrays", None)
        if isinstance(current, ArrayRecord):
            self.current_arrays = record
        elif isinstance(current, dict):
            self.current_arrays = {k: v.copy() for k, v in new.items()}
        return record
