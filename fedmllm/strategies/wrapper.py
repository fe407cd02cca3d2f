"""The strategy wrapper every run's server uses (Flower's wrapper style, as its
`DifferentialPrivacyServerSideFixedClipping`): it holds the algorithm's Flower strategy in
`self.strategy` and delegates to it, after checking and decoding every reply, and it reports each
round as a typed `RoundStats` through a callback.

    strategy = AdapterStrategy(fused(FedAvgM)(fraction_train=0.2, ...), max_update_norm=10.0,
                               on_round=stats.append)
    strategy.start(grid=grid, initial_arrays=..., num_rounds=3, evaluate_fn=...)

A reply is dropped, with its reason logged and kept in `RoundStats.clients`, when it carries an
error, other adapter keys or shapes, non-finite values, a non-finite or non-positive num-examples
(or one above `max_num_examples`), unreadable arrays, other metric keys than the round's other
replies, more than one MetricRecord, an update norm above `max_update_norm`, or other records that
the strategy's `check_extras` rejects. The wrapped strategy sees only the valid replies.

What the wrapped strategy may offer besides Flower's Strategy API (all optional):
- `state_attrs`: names of its attributes that are server state, saved with every checkpoint and
  restored by `fedmllm run resume=` (Flower's FedOpt m_t / v_t, FedAvgM momentum_vector, SCAFFOLD's c);
- `check_extras(reference, extras)`: raise InvalidReply for a reply whose records beside the
  adapter (SCAFFOLD's dc, FedSA-LoRA's B) are not what it needs;
- `fixed`: adapter tensors it updates that complete the global adapter without travelling
  (FedSA-LoRA's average B, for the server's evaluation);
- `checks_values`: it decodes the replies itself and checks its aggregate for non-finite values,
  raising UnusableReplies that names the replies it cannot use (FusedAverage: one decoding and one
  finiteness pass instead of one per reply here); the wrapper drops those and asks again;
- `leave_out(node_id)`: never sample that node again (its partition is empty);
- `update_norms`: {node id: the L2 norm of the update it aggregated for that reply} (the DP
  wrappers of strategies.private: the clipped norms), logged in the reply's client row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmllm.models.adapter import payload_bytes
from fedmllm.privacy import SUM_CLIENTS_KEY
from fedmllm.records import declared, from_record, to_record
from fedmllm.strategies.aggregate import (
    REPLY_ERRORS,
    InvalidReply,
    UnusableReplies,
    all_finite,
    check_reply,
    check_weight,
    unreadable,
    update_norm,
)
from fedmllm.transport import TransportSettings, encode_download
from fedmllm.transport import decode as transport_decode


@dataclass
class RoundStats:
    """What one round moved and kept. `clients`: one row per reply (partition-id, num-examples,
    train-loss, bytes accepted, `dropped` with the reason where it was left out); `extra`: numbers
    the strategy or `post_aggregate` reported (FLoRA's truncation error, the global alignment's
    seconds and loss), logged as they are named."""

    round: int
    bytes_down: int = 0
    bytes_down_per_client: int = 0
    bytes_up_per_client: dict[int, int] = field(default_factory=dict)
    clients: list[dict] = field(default_factory=list)
    train_loss: float | None = None
    aggregated: bool = False
    extra: dict[str, float] = field(default_factory=dict)
    # client-side evaluation (eval.client_fraction): per client partition-id, accuracy, macro_f1,
    # num-examples (held-out samples), or `dropped`
    client_eval: list[dict] = field(default_factory=list)

    @property
    def bytes_up(self) -> int:
        return sum(self.bytes_up_per_client.values())

    @property
    def dropped(self) -> list[str]:
        return [row["dropped"] for row in self.clients if "dropped" in row]


class AdapterStrategy(Strategy):
    """Flower's `strategy` over the adapter tensors, behind reply checks (see the module doc).

    Settings: `max_update_norm` / `max_num_examples` (drop a reply above them; None: no bound),
    `free_rank` (LoRA factors may come at another rank than the global adapter's: FLoRA), `fixed`
    (adapter tensors that do not travel but complete the global adapter: FFA-LoRA's A),
    `round_offset` (rounds a resumed run had done), `post_aggregate(server_round, arrays) ->
    (arrays or None, stats)` (replaces the aggregate before it becomes the global adapter: the
    server's global alignment), `on_round(RoundStats)` (called once per round, after aggregation),
    `client_eval(server_round) -> bool` (the rounds whose clients evaluate their own model on their
    held-out split, through the wrapped strategy's configure_evaluate; None: never).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        max_update_norm: float | None = None,
        max_num_examples: int | None = None,
        free_rank: bool = False,
        fixed: dict | None = None,
        round_offset: int = 0,
        post_aggregate: Callable | None = None,
        on_round: Callable[[RoundStats], None] | None = None,
        transport: TransportSettings | None = None,
        client_eval: Callable[[int], bool] | None = None,
    ):
        for name, value in (("max_update_norm", max_update_norm), ("max_num_examples", max_num_examples)):
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            ):
                raise ValueError(f"aggregator.{name}={value!r} must be null or a number > 0")
        self.strategy = strategy
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.max_num_examples = max_num_examples
        self.free_rank = free_rank
        self.fixed: dict = dict(fixed or {})
        self.round_offset = int(round_offset)
        self.post_aggregate = post_aggregate
        self.on_round = on_round
        self.transport = transport if transport is not None and transport.active else None
        self.client_eval = client_eval
        self._held: dict[int, dict] = {}  # transport.down_codec: each node's global adapter as it decoded it
        self.rounds_aggregated = 0  # rounds whose replies were aggregated (a run with none fails)
        self.dropped: list[tuple[int, str]] = []  # (round, reason) of every dropped reply
        self.empty_nodes: set[int] = set()  # nodes that reported an empty partition
        self._reference: dict | None = None  # the global adapter sent this round
        self._layout: dict | None = None
        self._stats = RoundStats(0)

    def __repr__(self) -> str:
        return f"AdapterStrategy({self.strategy!r})"

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> adapter reply checks: max_update_norm=%s, max_num_examples=%s",
            self.max_update_norm,
            self.max_num_examples,
        )
        self.strategy.summary()

    # --- settings the run reads --------------------------------------------------------------------
    @property
    def min_train_nodes(self) -> int:
        return int(getattr(self.strategy, "min_train_nodes", 1))

    @property
    def arrayrecord_key(self) -> str:
        return getattr(self.strategy, "arrayrecord_key", "arrays")

    @property
    def weighted_by_key(self) -> str:
        return getattr(self.strategy, "weighted_by_key", "num-examples")

    def full_payload(self, arrays: dict) -> dict:
        """The complete adapter for evaluation and checkpoints: the shared payload + `fixed`."""
        return {**self.fixed, **getattr(self.strategy, "fixed", {}), **arrays}

    def state_arrays(self) -> dict:
        """Flat {"<attr>/<key>": array} of the server state: `fixed` and the wrapped strategy's
        `state_attrs`."""
        out = {f"fixed/{k}": v for k, v in {**self.fixed, **getattr(self.strategy, "fixed", {})}.items()}
        for attr in getattr(self.strategy, "state_attrs", ()):
            value = getattr(self.strategy, attr, None)
            if isinstance(value, dict):
                out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
            elif isinstance(value, list):
                out.update({f"{attr}/#{i}": np.asarray(v) for i, v in enumerate(value)})
        return out

    def load_state_arrays(self, flat: dict) -> None:
        """Restore what `state_arrays` saved (`fixed` here; the rest on the wrapped strategy)."""
        groups: dict[str, dict] = {}
        for name, v in flat.items():
            attr, key = name.split("/", 1)
            groups.setdefault(attr, {})[key] = v
        allowed = getattr(self.strategy, "state_attrs", ())
        for attr, items in groups.items():
            if attr == "fixed":
                self.fixed = dict(items)
                continue
            if attr not in allowed:
                raise KeyError(f"saved strategy state {attr!r} is not state of {type(self.strategy).__name__}")
            value = (
                [items[f"#{i}"] for i in range(len(items))] if all(k.startswith("#") for k in items) else dict(items)
            )
            self.strategy.load_state(attr, value)  # the strategy's own setter (fused.FusedAverage)

    # --- training rounds -----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._reference = from_record(arrays)
        # what a reply's adapter must declare, per key: (shape, bytes) of the float32 tensor sent
        self._layout = {k: (tuple(v.shape), 4 * v.size) for k, v in self._reference.items()}
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.transport is not None and self.transport.down:
            # each node gets the new adapter's difference from what it holds, encoded; Flower's
            # strategies may share one RecordDict between messages, so each gets its own
            sent = [from_record(m.content[self.arrayrecord_key]) for m in messages]
            for m, adapter in zip(messages, sent):
                node = m.metadata.dst_node_id
                encoded, self._held[node] = encode_download(adapter, self._held.get(node), self.transport)
                content = RecordDict(dict(m.content.items()))
                content[self.arrayrecord_key] = to_record(encoded)
                m.content = content
        record_bytes: dict[int, int] = {}  # per record object: messages may share one (read what it declares)
        sizes = [
            sum(
                record_bytes.setdefault(id(r), sum(declared(a).nbytes for a in r.values()))
                for r in m.content.array_records.values()
            )
            for m in messages
        ]
        down = round(sum(sizes) / len(sizes)) if sizes else 0
        self._stats = RoundStats(server_round, bytes_down=sum(sizes), bytes_down_per_client=down)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self._stats
        replies = list(replies)
        metric_keys = _usual_metric_keys(replies)  # the keys every client sends: the odd reply is dropped
        valid: list[Message] = []
        rows: list[dict] = []  # the client row of each valid reply
        sent_bytes = dense_bytes = 0  # encoded uploads (transport) and the fp32 adapters they decode to
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                row = {"partition-id": int(node), "bytes": 0}
                stats.clients.append(row)
                self._drop(server_round, node, row, f"error reply (code {msg.error.code}: {msg.error.reason})")
                continue
            records = list(msg.content.metric_records.values())
            metrics = records[0] if records else {}
            row = _client_row(metrics, node)
            stats.clients.append(row)
            if metrics.get("empty-partition"):
                row["dropped"] = "empty partition"
                log(
                    WARNING,
                    "round %s: node %s has nothing to train (an empty partition, or it sits out under "
                    "aggregator=local/centralized); it is left out of sampling from now on",
                    server_round,
                    node,
                )
                self.empty_nodes.add(node)
                if hasattr(self.strategy, "leave_out"):
                    self.strategy.leave_out(node)
                continue
            try:
                encoded = self._decode_upload(msg) if self.transport is not None and self.transport.up else None
                nbytes = self._check(msg, records, metric_keys)
            except REPLY_ERRORS as err:
                self._drop(server_round, node, row, unreadable(err))
                continue
            if encoded is not None:  # what travelled: the encoded update, not the adapter it decodes to
                nbytes += encoded[0] - encoded[1]
                sent_bytes += encoded[0]
                dense_bytes += encoded[1]
            stats.bytes_up_per_client[row["partition-id"]] = row["bytes"] = nbytes
            valid.append(msg)
            rows.append(row)
        if dense_bytes:
            stats.extra["transport_ratio"] = sent_bytes / dense_bytes  # the uploads' bytes / their fp32 bytes
        return self._aggregate(server_round, valid, rows, metric_keys)

    def aggregate_secure(
        self, server_round: int, mean: dict | None, client_metrics: list[dict], failures: list[str]
    ) -> ArrayRecord | None:
        """A secure aggregation round (strategies.secure): the clients' mean, unmasked by SecAgg+,
        in place of their replies; `client_metrics`: each client's training metrics (with its
        `node-id`). The wrapped strategy aggregates the mean as one reply of the round's clients
        (the DP wrapper noising for their number). Returns the new global adapter, or None."""
        server_round += self.round_offset
        stats = self._stats
        for metrics in client_metrics:
            row = _client_row(metrics, metrics["node-id"])
            row["bytes"] = 0  # the masked vector: what a client uploaded cannot be read, nor counted as an adapter
            stats.clients.append(row)
        for reason in failures:
            self.dropped.append((server_round, reason))
            log(WARNING, "round %s: secure aggregation: %s", server_round, reason)
        if mean is None or not client_metrics:
            self._aggregate(server_round, [], [], None)
            return None
        n = len(client_metrics)
        losses = [m["train-loss"] for m in client_metrics if np.isfinite(m.get("train-loss", np.nan))]
        reply = Message(
            content=RecordDict(
                {
                    self.arrayrecord_key: to_record({k: np.asarray(v, np.float32) for k, v in mean.items()}),
                    "metrics": MetricRecord(
                        {
                            self.weighted_by_key: float(n),
                            "train-loss": float(np.mean(losses)) if losses else 0.0,
                            SUM_CLIENTS_KEY: float(n),  # a DP wrapper's noise: for the n clients in the mean
                        }
                    ),
                }
            ),
            dst_node_id=0,
            message_type="train",
        )
        keys = {self.weighted_by_key, "train-loss", SUM_CLIENTS_KEY}
        arrays, _ = self._aggregate(server_round, [reply], [{}], keys, clients=n)
        return arrays

    def _aggregate(
        self,
        server_round: int,
        valid: list[Message],
        rows: list[dict],
        metric_keys: set[str] | None,
        clients: int | None = None,
    ):
        """The wrapped strategy's aggregation of the valid replies (dropping those it names as
        unusable), the float32 aggregate, post_aggregate, and the round's report. `clients`: the
        clients behind the replies (secure aggregation: one mean of that many), else one each."""
        stats = self._stats
        stats.clients.sort(key=lambda c: c["partition-id"])
        arrays, metrics = None, None
        need = max(1, self.min_train_nodes - len(self.empty_nodes))

        def count() -> int:
            return clients if clients is not None and valid else len(valid)

        while count() >= need:
            try:
                arrays, metrics = self.strategy.aggregate_train(server_round, valid)
                norms = getattr(self.strategy, "update_norms", None) or {}  # privacy: the clipped norms
                for msg, row in zip(valid, rows):
                    if msg.metadata.src_node_id in norms:
                        row["update-norm"] = norms[msg.metadata.src_node_id]
                break
            except UnusableReplies as err:  # the strategy read the values: drop those it names, ask again
                for i, reason in err.reasons.items():
                    stats.bytes_up_per_client.pop(rows[i]["partition-id"], None)
                    rows[i]["bytes"] = 0
                    self._drop(server_round, valid[i].metadata.src_node_id, rows[i], reason)
                valid = [m for i, m in enumerate(valid) if i not in err.reasons]
                rows = [r for i, r in enumerate(rows) if i not in err.reasons]
        if count() < need:
            log(
                WARNING,
                "round %s: %d valid replies < min_train_nodes=%d; no aggregation",
                server_round,
                count(),
                self.min_train_nodes,
            )
        if arrays is not None:
            arrays = _float32(arrays)
            self.rounds_aggregated += 1
            stats.aggregated = True
            if metrics is not None:
                if "train-loss" in metrics:
                    stats.train_loss = float(metrics["train-loss"])
                # what the strategy reports beyond the replies' metrics (FLoRA's truncation error)
                stats.extra.update(
                    {
                        k: float(v)
                        for k, v in metrics.items()
                        if k not in (metric_keys or ()) and isinstance(v, (int, float))
                    }
                )
            if self.post_aggregate is not None:
                new, extra = self.post_aggregate(server_round, from_record(arrays))
                if new is not None:
                    arrays = to_record(new)
                    stats.extra.update(extra)
        if self.on_round is not None:
            self.on_round(stats)
        return arrays, metrics

    def _check(self, msg: Message, records: list[MetricRecord], metric_keys: set[str] | None) -> int:
        """Raise InvalidReply (or a decoding error) unless the reply (with its MetricRecords
        `records`) is one to aggregate; its bytes."""
        if len(records) != 1:
            raise InvalidReply(f"{len(records)} MetricRecords, expected one")
        metrics = records[0]
        keys = set(metrics)
        if metric_keys is not None and keys != metric_keys:
            raise InvalidReply(
                f"metric keys differ from the round's other replies (unexpected "
                f"{sorted(keys - metric_keys)}, missing {sorted(metric_keys - keys)})"
            )
        record = msg.content[self.arrayrecord_key]
        per_reply_finite = not getattr(self.strategy, "checks_values", False)
        if not per_reply_finite and self.max_update_norm is None and len(msg.content.array_records) == 1:
            nbytes = self._declares_the_layout(record)
            if nbytes is not None:  # keys, shapes and dtypes as sent: only the weight is left to check
                weight = metrics.get(self.weighted_by_key)
                check_weight(weight)
                if self.max_num_examples is not None and weight > self.max_num_examples:
                    raise InvalidReply(f"num-examples={weight!r} > aggregator.max_num_examples={self.max_num_examples}")
                return nbytes
        # the values are read only where a check here needs them; otherwise keys, shapes and dtypes
        # are the Arrays' declared ones and the strategy decodes the replies (naming the unreadable)
        arrays = (
            from_record(record)
            if per_reply_finite or self.max_update_norm is not None
            else {k: declared(v) for k, v in record.items()}
        )
        weight = metrics.get(self.weighted_by_key)
        check_reply(self._reference or arrays, arrays, weight, free_rank=self.free_rank, finite=False)
        if per_reply_finite:
            for k, v in arrays.items():
                if not all_finite(v):
                    raise InvalidReply(f"{k}: non-finite values")
        self._check_norm(arrays)
        if self.max_num_examples is not None and weight > self.max_num_examples:
            raise InvalidReply(f"num-examples={weight!r} > aggregator.max_num_examples={self.max_num_examples}")
        extras = {
            name: from_record(rec) for name, rec in msg.content.array_records.items() if name != self.arrayrecord_key
        }
        for name, rec in extras.items():
            for k, v in rec.items():
                if not all_finite(v):
                    raise InvalidReply(f"{name}/{k}: non-finite values")
        if hasattr(self.strategy, "check_extras"):
            self.strategy.check_extras(self._reference or arrays, extras)
        else:  # a strategy that reads no other records gets the adapter alone, as Flower's expect
            for name in extras:
                del msg.content[name]
        return sum(a.nbytes for a in arrays.values()) + sum(a.nbytes for e in extras.values() for a in e.values())

    def _decode_upload(self, msg: Message) -> tuple[int, int]:
        """Replace a reply's encoded update (transport) by the adapter it decodes to: the global
        adapter sent plus the update. Returns (bytes sent, bytes of the fp32 adapter)."""
        # the adapter this node started from: the global one, or with compressed downloads its own copy
        start = self._held.get(msg.metadata.src_node_id) if self.transport.down else self._reference
        if start is None:
            raise InvalidReply("an encoded update, but no adapter was sent to this node this round")
        encoded = from_record(msg.content[self.arrayrecord_key])
        try:
            update = transport_decode(encoded, {k: v.shape for k, v in start.items()}, self.transport.block)
        except (ValueError, KeyError, RuntimeError) as err:
            raise InvalidReply(f"undecodable update ({self.transport.codec}): {err}") from None
        adapter = {k: start[k] + u for k, u in update.items()}
        msg.content[self.arrayrecord_key] = to_record(adapter)
        return payload_bytes(encoded), sum(4 * u.size for u in update.values())

    def _declares_the_layout(self, record: ArrayRecord) -> int | None:
        """The bytes of a reply's adapter when every Array declares the key, shape and dtype
        (float32) of the adapter sent this round, else None (check_reply then names what differs).
        Reads only the declarations: the strategy decodes the values and names unreadable ones."""
        layout = self._layout
        if layout is None or self.free_rank or len(record) != len(layout):
            return None
        total = 0
        for k, a in record.items():
            want = layout.get(k)
            if want is None or a.shape != want[0] or a.dtype != "float32":
                return None
            total += want[1]
        return total

    def _check_norm(self, arrays: dict) -> None:
        """`max_update_norm`: drop a reply whose update (its adapter minus the global one sent)
        has a larger L2 norm over all tensors, naming the norm."""
        if self.max_update_norm is None or self._reference is None:
            return
        norm = update_norm(arrays, self._reference)
        if not norm <= self.max_update_norm:
            raise InvalidReply(f"update norm {norm:.4g} > aggregator.max_update_norm={self.max_update_norm:g}")

    def _drop(self, server_round: int, node: int, row: dict, reason: str) -> None:
        log(WARNING, "round %s: dropped reply from node %s: %s", server_round, node, reason)
        self.dropped.append((server_round, reason))
        row["dropped"] = reason

    # --- client-side evaluation (eval.client_fraction); the server's own is the run's evaluate_fn ----------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.client_eval is None or not self.client_eval(server_round):
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Each client's accuracy on its own held-out split into the round's RoundStats
        (`client_eval`), and their mean, spread (population std) and worst client into its `extra`
        (client_accuracy_mean, client_accuracy_std, client_accuracy_min, client_accuracy_worst: the
        worst client's partition id). Clients with nothing to evaluate are left out."""
        rows = []
        for msg in replies:
            if msg.has_error():
                rows.append({"partition-id": int(msg.metadata.src_node_id), "dropped": msg.error.reason})
                continue
            records = list(msg.content.metric_records.values())
            metrics = records[0] if records else {}
            n = metrics.get("num-examples", 0)
            if not (isinstance(n, (int, float)) and n > 0):
                continue
            row = {
                "partition-id": int(metrics.get("partition-id", msg.metadata.src_node_id)),
                "num-examples": int(n),
            }
            row.update({k: float(metrics[k]) for k in ("accuracy", "macro_f1") if k in metrics})
            rows.append(row)
        rows.sort(key=lambda r: r["partition-id"])
        self._stats.client_eval = rows
        scored = [r for r in rows if np.isfinite(r.get("accuracy", np.nan))]
        if not scored:
            return None
        acc = np.asarray([r["accuracy"] for r in scored])
        worst = scored[int(acc.argmin())]
        summary = {
            "client_accuracy_mean": float(acc.mean()),
            "client_accuracy_std": float(acc.std()),
            "client_accuracy_min": float(acc.min()),
            "client_accuracy_worst": worst["partition-id"],
        }
        self._stats.extra.update(summary)
        return MetricRecord(summary)


def _float32(record: ArrayRecord) -> ArrayRecord:
    """The global adapter in float32, as checkpoints store it and clients send it. Flower's FedOpt
    strategies return float64 (their bias-corrected step size is a numpy float64): kept, the server
    would continue from values a resumed run, reading the float32 checkpoint, does not have
    (FedAdam's resumed adapters differed by 1e-6 two rounds later)."""
    if all(a.dtype == "float32" for a in record.values()):
        return record
    return to_record({k: np.asarray(v, np.float32) for k, v in from_record(record).items()})


def _usual_metric_keys(replies: list[Message]) -> set[str] | None:
    """The metric keys most replies of a round carry (every client sends the same ones): a reply
    with others is the odd one out, whichever order the replies came in."""
    sets = Counter(
        frozenset(next(iter(m.content.metric_records.values())))
        for m in replies
        if not m.has_error() and len(m.content.metric_records) == 1
    )
    return set(sets.most_common(1)[0][0]) if sets else None


def _client_row(metrics: Any, node_id: int) -> dict:
    """A reply's row in metrics.jsonl's `clients`: partition-id, num-examples (its aggregation
    weight), train-loss, image and text tokens per trained sample, and bytes sent (0 until it is
    accepted)."""

    def number(key):
        value = metrics.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    pid = number("partition-id")
    row = {
        "partition-id": int(pid) if pid is not None and np.isfinite(pid) else int(node_id),
        "num-examples": number("num-examples"),
        "train-loss": number("train-loss"),
        "bytes": 0,
    }
    for key in ("image-tokens", "text-tokens"):  # per trained sample, where the client reports them
        if number(key) is not None:
            row[key] = number(key)
    return row
