"""Reply validation and payload accounting, mixed into Flower's strategies (the round loop stays theirs)."""

from __future__ import annotations

import functools
from logging import WARNING
from typing import Iterable, NamedTuple

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmllm.records import from_record
from fedmllm.strategies.aggregate import InvalidReply, check_reply


# What decoding a malformed reply raises (corrupt .npy bytes, another stype, a missing record), on
# top of our own InvalidReply: each drops that reply with its reason, never the round.
REPLY_ERRORS = (InvalidReply, KeyError, StopIteration, ValueError, TypeError, EOFError, OSError, AttributeError)


class ValidReplies(NamedTuple):
    """The valid replies of a round, decoded once: adapter payloads, their other array records
    (SCAFFOLD's dc, FedSA-LoRA's B) and their weights (num-examples), in reply order."""

    payloads: list[dict]
    extras: list[dict]
    weights: list[float]


class AdapterReplies:
    """Mixin for a Flower strategy: replies are checked against the global adapter before aggregation.

    A bad reply (other keys or shapes, non-finite values, a non-finite or non-positive
    num-examples, unreadable arrays, other metric keys than the round's other replies, more than
    one MetricRecord, an update norm above `max_update_norm`) is dropped with its reason logged; the round fails only if fewer than `min_train_nodes` valid replies remain.
    `round_stats` holds bytes down/up and per-client bytes of the last round, for logging.
    Settings beside the aggregator's: `fixed` (adapter tensors that do not travel but complete the
    global adapter: FFA-LoRA's A, FedSA-LoRA's B), `round_offset` (rounds a resumed run had done),
    `post_aggregate(server_round, arrays) -> (arrays, stats)` (transforms the aggregate before it
    becomes the global adapter: the server's global alignment; its stats join round_stats).
    """

    free_rank = False  # replies may differ from the global adapter in LoRA rank (FLoRA)
    # Server state saved with every checkpoint and restored by `fedmllm run resume=<run dir>`:
    # Flower's optimizer moments (FedOpt m_t, v_t; FedAvgM momentum_vector) and ours.
    state_attrs: tuple[str, ...] = ("m_t", "v_t", "momentum_vector")

    def __init__(self, max_update_norm: float | None = None, max_num_examples: int | None = None, *,
                 fixed: dict | None = None, round_offset: int = 0, post_aggregate=None, **kwargs):
        for name, value in (("max_update_norm", max_update_norm), ("max_num_examples", max_num_examples)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"aggregator.{name}={value!r} must be null or a number > 0")
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.max_num_examples = max_num_examples
        kwargs.setdefault("fraction_evaluate", 0.0)  # evaluation is centralized on the server
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self._reference: dict | None = None
        self.round_stats: dict = {}
        self.dropped: list[tuple[int, str]] = []
        self.round_offset = int(round_offset)  # rounds already done before a resume
        self.rounds_aggregated = 0  # rounds whose replies were aggregated (a run with none fails)
        self.empty_nodes: set[int] = set()  # nodes that reported an empty partition: never sampled again
        self.fixed: dict = dict(fixed or {})  # adapter tensors that do not travel but complete the global adapter
        self.post_aggregate = post_aggregate

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord]:
        """Array records sent to every client besides the adapter (SCAFFOLD: the control variate)."""
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._reference = from_record(arrays)
        messages = self._sample_without_empty(server_round, arrays, config, grid)
        extra = self.extra_records(server_round)
        for msg in messages:
            for name, record in extra.items():
                msg.content[name] = record
        down = sum(a.nbytes for a in self._reference.values())
        down += sum(a.nbytes for r in extra.values() for a in from_record(r).values())
        self.round_stats = {"bytes_down": down * len(messages), "bytes_down_per_client": down}
        return messages

    def _sample_without_empty(self, server_round, arrays, config, grid) -> list[Message]:
        """Flower's sampling over the nodes that have data (minimums lowered by the empty ones)."""
        k = len(self.empty_nodes)
        if not k:
            return list(super().configure_train(server_round, arrays, config, grid))
        saved = self.min_available_nodes, self.min_train_nodes
        self.min_available_nodes, self.min_train_nodes = max(1, saved[0] - k), max(1, saved[1] - k)
        try:
            return list(super().configure_train(server_round, arrays, config, _NodesWithData(grid, self.empty_nodes)))
        finally:
            self.min_available_nodes, self.min_train_nodes = saved

    def full_payload(self, arrays: dict) -> dict:
        """The complete adapter for evaluation and checkpoints: the shared payload + `fixed`."""
        return {**self.fixed, **arrays}

    def state_arrays(self) -> dict:
        """Flat {"<attr>/<key>": array} of the server state in `state_attrs` (+ `fixed`)."""
        import numpy as np

        out = {f"fixed/{k}": v for k, v in self.fixed.items()}
        for attr in self.state_attrs:
            value = getattr(self, attr, None)
            if isinstance(value, dict):
                out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
            elif isinstance(value, list):
                out.update({f"{attr}/#{i}": np.asarray(v) for i, v in enumerate(value)})
        return out

    def load_state_arrays(self, flat: dict) -> None:
        """Restore what `state_arrays` saved."""
        groups: dict[str, dict] = {}
        for name, v in flat.items():
            attr, key = name.split("/", 1)
            groups.setdefault(attr, {})[key] = v
        for attr, items in groups.items():
            if attr != "fixed" and attr not in self.state_attrs:
                raise KeyError(f"saved strategy state {attr!r} is not state of {type(self).__name__}")
            if all(k.startswith("#") for k in items):
                value = [items[f"#{i}"] for i in range(len(items))]
            else:
                value = dict(items)
            setattr(self, attr, value)

    def min_valid_replies(self) -> int:
        """Valid replies a round needs: min_train_nodes, less the nodes left out as empty."""
        return max(1, self.min_train_nodes - len(getattr(self, "empty_nodes", ())))

    def train_metrics(self, valid: list[Message]) -> MetricRecord | None:
        """Flower's reply consistency check and metric aggregation, for strategies that aggregate
        the arrays themselves."""
        ok, _ = self._check_and_log_replies(valid, is_train=True)  # type: ignore[attr-defined]
        return self.train_metrics_aggr_fn([m.content for m in ok], self.weighted_by_key) if ok else None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        valid: list[Message] = []
        per_client: dict[int, int] = {}
        clients: list[dict] = []  # one row per reply: who contributed what (metrics.jsonl `clients`)
        replies = list(replies)
        metric_keys = _usual_metric_keys(replies)  # Flower rejects a round whose replies differ
        decoded = ValidReplies([], [], [])
        self._decoded: dict[int, dict] = {}
        for msg in replies:
            if msg.has_error():
                valid.append(msg)  # Flower's own check logs and drops it
                continue
            metrics = next(iter(msg.content.metric_records.values()), {})
            client = _client_row(metrics, msg.metadata.src_node_id)
            clients.append(client)
            if metrics.get("empty-partition"):
                client["dropped"] = "empty partition"
                log(WARNING, "round %s: node %s has nothing to train (an empty partition, or it sits out under "
                    "aggregator=local/centralized); it is left out of sampling from now on",
                    server_round, msg.metadata.src_node_id)
                self.empty_nodes.add(msg.metadata.src_node_id)
                continue
            try:
                metrics = self._check_metrics(msg, metric_keys)
                arrays = from_record(msg.content[self.arrayrecord_key])
                check_reply(self._reference or arrays, arrays, metrics.get(self.weighted_by_key),
                            free_rank=self.free_rank, finite=not getattr(self, "fused_average", False))  # FusedAverage checks it on the aggregate
                self._check_norm(arrays)
                weight = metrics.get(self.weighted_by_key)
                if self.max_num_examples is not None and weight is not None and weight > self.max_num_examples:
                    raise InvalidReply(f"num-examples={weight!r} > aggregator.max_num_examples={self.max_num_examples}")
                extra = {name: from_record(rec)
                         for name, rec in msg.content.array_records.items() if name != self.arrayrecord_key}
                self.check_extra(extra)
            except REPLY_ERRORS as err:
                reason = str(err) if isinstance(err, InvalidReply) else f"unreadable reply ({type(err).__name__}: {err})"
                log(WARNING, "round %s: dropped reply from node %s: %s", server_round, msg.metadata.src_node_id, reason)
                self.dropped.append((server_round, reason))
                client["dropped"] = reason
                continue
            for name in extra:  # Flower's aggregation expects exactly one ArrayRecord per reply
                del msg.content[name]
            per_client[client["partition-id"]] = sum(
                a.nbytes for a in arrays.values()
            ) + sum(a.nbytes for e in extra.values() for a in e.values())
            client["bytes"] = per_client[client["partition-id"]]
            self._decoded[id(msg)] = arrays  # for FusedAverage, which Flower's strategies call with messages only
            decoded.payloads.append(arrays)
            decoded.extras.append(extra)
            decoded.weights.append(float(metrics[self.weighted_by_key]))
            valid.append(msg)
        self.round_stats.update(bytes_up=sum(per_client.values()), bytes_up_per_client=per_client,
                                clients=sorted(clients, key=lambda c: c["partition-id"]))
        if len(decoded.payloads) < self.min_valid_replies():
            log(WARNING, "round %s: %d valid replies < min_train_nodes=%d; no aggregation",
                server_round, len(decoded.payloads), self.min_train_nodes)
            return None, None
        arrays, metrics = self.aggregate_replies(server_round, valid, decoded)
        self._decoded = {}
        if arrays is not None:
            arrays = _float32(arrays)
            self.rounds_aggregated += 1
        if metrics is not None and "train-loss" in metrics:
            self.round_stats["train_loss"] = float(metrics["train-loss"])
        if arrays is not None and self.post_aggregate is not None:
            arrays = self._post_aggregate(server_round, arrays)
        return arrays, metrics

    def _check_metrics(self, msg: Message, reference: set[str] | None) -> MetricRecord:
        """The reply's one MetricRecord, with the keys most of the round's replies carry (Flower
        raises InconsistentMessageReplies for the whole round otherwise)."""
        records = list(msg.content.metric_records.values())
        if len(records) != 1:
            raise InvalidReply(f"{len(records)} MetricRecords, expected one")
        keys = set(records[0])
        if reference is not None and keys != reference:
            raise InvalidReply(f"metric keys differ from the round's other replies (unexpected {sorted(keys - reference)}, "
                               f"missing {sorted(reference - keys)})")
        return records[0]

    def _check_norm(self, arrays: dict) -> None:
        """`max_update_norm`: drop a reply whose update (its adapter minus the global one sent)
        has a larger L2 norm over all tensors, naming the norm."""
        if self.max_update_norm is None or self._reference is None:
            return
        sq = 0.0
        for k, v in arrays.items():
            diff = v.astype(np.float64)
            ref = self._reference.get(k)
            if ref is not None and ref.shape == v.shape:  # FLoRA's other-rank factors count whole
                diff -= ref
            sq += float(np.vdot(diff, diff))
        norm = float(np.sqrt(sq))
        if not norm <= self.max_update_norm:
            raise InvalidReply(f"update norm {norm:.4g} > aggregator.max_update_norm={self.max_update_norm:g}")

    def check_extra(self, extra: dict) -> None:
        """Validate a reply's other array records (finite values); subclasses check their shapes."""
        import numpy as np

        for name, rec in extra.items():
            for k, v in rec.items():
                if not np.isfinite(v).all():
                    raise InvalidReply(f"{name}/{k}: non-finite values")

    def aggregate_replies(self, server_round: int, valid: list[Message], decoded: ValidReplies
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregation proper: Flower's, unless SCAFFOLD or a LoRA-aware strategy replaces it
        (`decoded`: the valid replies' arrays, other records and weights)."""
        return super().aggregate_train(server_round, valid)  # type: ignore[misc]

    def _post_aggregate(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        from fedmllm.records import to_record

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


def _float32(record: ArrayRecord) -> ArrayRecord:
    """The global adapter in float32, as checkpoints store it and clients send it. Flower's FedOpt
    strategies return float64 (their bias-corrected step size is a numpy float64): kept, the server
    would continue from values a resumed run, reading the float32 checkpoint, does not have
    (FedAdam's resumed adapters differed by 1e-6 two rounds later)."""
    if all(a.dtype == "float32" for a in record.values()):
        return record
    from fedmllm.records import to_record

    return to_record({k: np.asarray(v, np.float32) for k, v in from_record(record).items()})


def _usual_metric_keys(replies: list[Message]) -> set[str] | None:
    """The metric keys most replies of a round carry (every client sends the same ones): a reply
    with others is the odd one out, whichever order the replies came in."""
    from collections import Counter

    sets = Counter(frozenset(next(iter(m.content.metric_records.values()))) for m in replies
                   if not m.has_error() and len(m.content.metric_records) == 1)
    return set(sets.most_common(1)[0][0]) if sets else None


def _client_row(metrics, node_id: int) -> dict:
    """A reply's row in metrics.jsonl's `clients`: partition-id, num-examples (its aggregation
    weight), train-loss and bytes sent (0 until it is accepted)."""
    def number(key):
        value = metrics.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    pid = number("partition-id")
    return {"partition-id": int(pid) if pid is not None and np.isfinite(pid) else int(node_id),
            "num-examples": number("num-examples"), "train-loss": number("train-loss"), "bytes": 0}


class _NodesWithData:
    """A Grid view without the nodes whose partition is empty (for Flower's node sampling)."""

    def __init__(self, grid: Grid, empty: set[int]):
        self._grid, self._empty = grid, empty

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n not in self._empty]

    def __getattr__(self, name):
        return getattr(self._grid, name)


class FusedAverage(FedAvg):
    """Flower's FedAvg.aggregate_train with the weighted average done by
    aggregate.weighted_average_fused over the replies AdapterReplies already decoded as zero-copy
    views (Flower's own decodes every reply again with np.load and allocates a temporary per array). Placed after Flower's
    strategy in the bases, so FedAvgM / FedOpt get the average from here and step from it."""

    fused_average = True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        from fedmllm.records import RecordBuffer
        from fedmllm.strategies.aggregate import weighted_average_fused

        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        decoded = getattr(self, "_decoded", {})
        payloads = [decoded.pop(id(m), None) or from_record(m.content[self.arrayrecord_key]) for m in valid]
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid]
        buffer = RecordBuffer({k: v.shape for k, v in payloads[0].items()})
        _, bad = weighted_average_fused(payloads, weights, out=buffer.arrays)
        stats = getattr(self, "round_stats", {})
        for i in bad:
            node = valid[i].metadata.src_node_id
            log(WARNING, "round %s: dropped reply from node %s: non-finite values", server_round, node)
            getattr(self, "dropped", []).append((server_round, "non-finite values"))
            pid = int(next(iter(valid[i].content.metric_records.values())).get("partition-id", node))
            stats.get("bytes_up_per_client", {}).pop(pid, None)
            for row in stats.get("clients", []):
                if row["partition-id"] == pid:
                    row.update(bytes=0, dropped="non-finite values")
        if bad and "bytes_up_per_client" in stats:
            stats["bytes_up"] = sum(stats["bytes_up_per_client"].values())
        valid = [m for i, m in enumerate(valid) if i not in bad]
        if len(valid) < AdapterReplies.min_valid_replies(self):
            log(WARNING, "round %s: %d valid replies < min_train_nodes=%d; no aggregation",
                server_round, len(valid), self.min_train_nodes)
            return None, None
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return buffer.seal(), metrics


@functools.cache
def adapter_strategy(flower_strategy: type) -> type:
    """Flower's `flower_strategy` (FedAvg or a subclass: FedAvgM, FedProx, FedAdam, ...) over the
    adapter: AdapterReplies (reply checks) + Flower's class + FusedAverage (the weighted average
    in one pass over the already decoded replies). One class per Flower class."""
    bases = (AdapterReplies, FusedAverage) if flower_strategy is FedAvg else (AdapterReplies, flower_strategy, FusedAverage)
    return type(f"Adapter{flower_strategy.__name__}", bases, {
        "__module__": __name__,
        "__doc__": f"Flower's {flower_strategy.__name__} over the adapter tensors (replies checked first).",
    })
