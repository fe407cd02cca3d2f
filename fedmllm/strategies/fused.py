"""Flower's strategies with the weighted average done in one pass over zero-copy views.

`FusedAverage` is Flower's FedAvg whose public `aggregate_train` averages with
aggregate.weighted_average_fused (Flower's decodes every reply with np.load and allocates a
temporary per array and client: 14.7x slower on LoRA r8, bench/aggregate.py). `fused(FedAvgM)`
is Flower's FedAvgM over it: FedAvgM's (FedProx's, FedOpt's) `aggregate_train` takes the average
from `super()`, which is FusedAverage's, and steps from it.

The replies reach these strategies through strategies.wrapper.AdapterStrategy, checked: no error
replies, one MetricRecord with the same keys each, finite adapters of the global adapter's shape.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmllm.records import RecordBuffer, from_record
from fedmllm.strategies.aggregate import REPLY_ERRORS, UnusableReplies, unreadable, weighted_average_fused


class FusedAverage(FedAvg):
    """Flower's FedAvg with the fused average, node sampling that skips nodes without data, and
    the optional parts of the wrapper's protocol (`state_attrs`, `load_state`, `leave_out`)."""

    # Server state saved with every checkpoint and restored on resume: Flower's optimizer moments
    # (FedOpt m_t, v_t; FedAvgM momentum_vector); subclasses name theirs.
    state_attrs: tuple[str, ...] = ("m_t", "v_t", "momentum_vector")
    # It decodes the replies itself and checks the average for finiteness once, naming the replies
    # it cannot use (UnusableReplies: unreadable, or non-finite); the wrapper then reads no values
    # (subclasses that aggregate otherwise set False and get every reply decoded and checked).
    checks_values = True
    # Whether the round's result buffer is made when the round is configured (the fused average
    # writes into it); strategies that aggregate otherwise (robust ones) make their own.
    prepares_result = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.empty_nodes: set[int] = set()
        # The round's result buffer, allocated and its pages mapped when the round is configured
        # (while the clients train) instead of inside the aggregation: in a first round those page
        # faults were about 4 ms of a 25 ms r8 aggregation (docs/benchmarks.md). Held until the
        # aggregation, the size of one adapter.
        self._next: RecordBuffer | None = None

    def load_state(self, attr: str, value: Any) -> None:
        """Restore one of `state_attrs` (what the wrapper's load_state_arrays read from a checkpoint)."""
        if attr not in self.state_attrs:
            raise KeyError(f"{attr!r} is not state of {type(self).__name__} ({list(self.state_attrs)})")
        setattr(self, attr, value)

    def leave_out(self, node_id: int) -> None:
        """Never sample `node_id` again (it reported an empty partition); the minimums drop with it."""
        self.empty_nodes.add(node_id)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if isinstance(getattr(self, "current_arrays", None), ArrayRecord):
            # FedAvgM steps from the global adapter it holds: the one sent, which the server's
            # global alignment may have replaced after the last aggregation.
            self.current_arrays = arrays
        if self.prepares_result:
            self._next = RecordBuffer({k: tuple(a.shape) for k, a in arrays.items()}, touch=True)
        k = len(self.empty_nodes)
        if not k:
            return list(super().configure_train(server_round, arrays, config, grid))
        saved = self.min_available_nodes, self.min_train_nodes
        self.min_available_nodes, self.min_train_nodes = max(1, saved[0] - k), max(1, saved[1] - k)
        try:
            return list(super().configure_train(server_round, arrays, config, _NodesWithData(grid, self.empty_nodes)))
        finally:
            self.min_available_nodes, self.min_train_nodes = saved

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid = list(replies)
        if not valid:
            return None, None
        payloads, unusable = [], {}
        for i, m in enumerate(valid):
            try:
                payloads.append(from_record(m.content[self.arrayrecord_key]))
            except REPLY_ERRORS as err:
                unusable[i] = unreadable(err)
        if unusable:
            raise UnusableReplies(unusable)
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid]
        shapes = {k: v.shape for k, v in payloads[0].items()}
        buffer, self._next = self._next, None
        if buffer is None or buffer.shapes != shapes:  # replies hold other tensors than were sent
            buffer = RecordBuffer(shapes)
        _, bad = weighted_average_fused(payloads, weights, out=buffer.arrays)
        if bad:
            raise UnusableReplies({i: "non-finite values" for i in bad})
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return buffer.seal(), metrics


@functools.cache
def fused(flower_strategy: type) -> type:
    """Flower's `flower_strategy` (FedAvg or a subclass: FedAvgM, FedProx, FedAdam, ...) with
    FusedAverage's average under it. One class per Flower class."""
    if flower_strategy is FedAvg:
        return FusedAverage
    return type(
        f"Fused{flower_strategy.__name__}",
        (flower_strategy, FusedAverage),
        {
            "__module__": __name__,
            "__doc__": f"Flower's {flower_strategy.__name__} over FusedAverage's weighted average.",
        },
    )


@functools.cache
def checked(flower_strategy: type) -> type:
    """Flower's `flower_strategy` aggregating as Flower does (the robust ones: FedMedian,
    FedTrimmedAvg, Krum, MultiKrum, Bulyan compute their own statistic of the replies), with
    FusedAverage's node sampling and state protocol; the wrapper decodes and checks every reply's
    values first (`checks_values` False), so a non-finite reply is dropped before the statistic."""
    return type(
        f"Checked{flower_strategy.__name__}",
        (flower_strategy, FusedAverage),
        {
            "__module__": __name__,
            "__doc__": f"Flower's {flower_strategy.__name__}, every reply checked by the wrapper.",
            "checks_values": False,
            "prepares_result": False,
        },
    )


class _NodesWithData:
    """A Grid view without the nodes whose partition is empty (for Flower's node sampling)."""

    def __init__(self, grid: Grid, empty: set[int]):
        self._grid, self._empty = grid, empty

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n not in self._empty]

    def __getattr__(self, name):
        return getattr(self._grid, name)
