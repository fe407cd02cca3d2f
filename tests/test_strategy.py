"""aggregator=fedavg's strategy (Flower's FedAvg with the fused average, inside the AdapterStrategy
wrapper): bad replies are dropped with a reason, good ones averaged by num-examples."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmllm.algorithms import algorithm_class
from fedmllm.records import from_record, to_record
from fedmllm.strategies.wrapper import AdapterStrategy, RoundStats

FedAvg = algorithm_class("fedavg")().strategy_class()


def AdapterFedAvg(max_update_norm=None, max_num_examples=None, **flower):
    """aggregator=fedavg's strategy as a run builds it; `.stats`: the RoundStats it reported."""
    stats: list[RoundStats] = []
    strategy = AdapterStrategy(
        FedAvg(**flower), max_update_norm=max_update_norm, max_num_examples=max_num_examples, on_round=stats.append
    )
    strategy.stats = stats
    return strategy


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run identity, as inside a ServerApp (run_simulation sets the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, k) for k in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, k, v)


class FakeGrid:
    """Just enough Grid for configure_train: three connected nodes."""

    def get_node_ids(self):
        return [11, 12, 13]


def reply(instruction: Message, arrays: dict, num_examples: int, pid: int) -> Message:
    content = RecordDict(
        {
            "arrays": to_record(arrays),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0 + pid, "partition-id": pid}),
        }
    )
    return Message(content, reply_to=instruction)


def run_round(replies_for):
    strategy = AdapterFedAvg(min_train_nodes=2, min_available_nodes=3, fraction_train=1.0)
    global_arrays = {"lora_A": np.zeros((2, 3), np.float32)}
    sent = list(strategy.configure_train(1, to_record(global_arrays), ConfigRecord(), FakeGrid()))
    return strategy, strategy.aggregate_train(1, replies_for(sent))


def test_bad_replies_are_dropped_and_the_rest_weighted_by_examples():
    def replies(sent):
        return [
            reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
            reply(sent[1], {"lora_A": np.full((2, 3), 3.0, np.float32)}, 30, 1),
            reply(sent[2], {"lora_A": np.full((2, 3), np.nan, np.float32)}, 10, 2),
        ]

    strategy, (arrays, metrics) = run_round(replies)
    # (10 * 1 + 30 * 3) / 40 = 2.5; the NaN reply is not in the average
    np.testing.assert_allclose(from_record(arrays)["lora_A"], 2.5)
    assert metrics["train-loss"] == (10 * 1.0 + 30 * 2.0) / 40
    assert len(strategy.dropped) == 1 and "non-finite" in strategy.dropped[0][1]
    [stats] = strategy.stats
    assert stats.bytes_up_per_client == {0: 24, 1: 24} and stats.bytes_up == 48
    assert stats.bytes_down == 3 * 24 and stats.train_loss == metrics["train-loss"] and stats.aggregated
    assert stats.dropped == ["non-finite values"]  # found on the aggregate, then left out


def test_round_fails_when_fewer_valid_replies_than_min_train_nodes():
    def replies(sent):
        return [
            reply(sent[0], {"lora_A": np.ones((2, 3), np.float32)}, 10, 0),
            reply(sent[1], {"lora_A": np.ones((3, 3), np.float32)}, 10, 1),  # wrong shape
        ]

    strategy, (arrays, metrics) = run_round(replies)
    assert arrays is None and metrics is None
    assert "shape" in strategy.dropped[0][1]
    assert len(strategy.stats) == 1 and not strategy.stats[0].aggregated  # reported all the same


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_every_aggregator_builds_from_config_and_validates_replies(name):
    from fedmllm.config import compose
    from fedmllm.server.run import build_strategy

    cfg = compose([f"aggregator={name}", "num_clients=3", "clients_per_round=3", "aggregator.min_train_nodes=2"])
    strategy = build_strategy(cfg)
    global_arrays = {"lora_A": np.zeros((2, 3), np.float32)}
    sent = list(strategy.configure_train(1, to_record(global_arrays), ConfigRecord(), FakeGrid()))
    assert len(sent) == 3
    if name == "fedprox":  # Flower's FedProx tells clients the proximal weight
        assert sent[0].content["config"]["proximal-mu"] == 0.01
    replies = [
        reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
        reply(sent[1], {"lora_A": np.full((2, 3), 3.0, np.float32)}, 30, 1),
        reply(sent[2], {"lora_A": np.full((2, 3), np.inf, np.float32)}, 10, 2),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = from_record(arrays)["lora_A"]
    assert np.isfinite(out).all() and len(strategy.dropped) == 1
    if name in ("fedavg", "fedprox", "fedavgm"):  # round 1: plain weighted average (momentum buffer = update)
        np.testing.assert_allclose(out, 2.5)
    else:  # a server optimizer step of size ~eta from 0 towards the average
        assert 0 < out.mean() < 0.1


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_post_aggregate_hook_replaces_the_global_adapter_and_server_state(name):
    """The server's global alignment: what post_aggregate returns is the new global adapter, and
    strategies with server state (FedAvgM, FedOpt) take their next update against it."""
    from fedmllm.config import compose
    from fedmllm.server.run import build_strategy

    calls, reported = [], []

    def align(rnd, arrays):
        calls.append((rnd, arrays["lora_A"].copy()))
        return {k: v + 10.0 for k, v in arrays.items()}, {"align_seconds": 0.5, "align_loss": 0.25}

    strategy = build_strategy(
        compose(
            [
                "aggregator=" + name,
                "num_clients=2",
                "clients_per_round=2",
                "aggregator.min_available_nodes=2",
                "aggregator.min_train_nodes=2",
            ]
        ),
        post_aggregate=align,
        on_round=reported.append,
    )
    global_arrays = {"lora_A": np.zeros((2, 3), np.float32)}
    sent = list(strategy.configure_train(1, to_record(global_arrays), ConfigRecord(), FakeGrid()))[:2]
    arrays, _ = strategy.aggregate_train(
        1, [reply(m, {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, i) for i, m in enumerate(sent)]
    )
    out = from_record(arrays)["lora_A"]
    assert len(calls) == 1 and calls[0][0] == 1
    np.testing.assert_allclose(out, calls[0][1] + 10.0)
    assert reported[0].extra == {"align_seconds": 0.5, "align_loss": 0.25}
    # the next round starts from the aligned adapter, and so does the server optimizer's state
    strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid())
    current = getattr(strategy.strategy, "current_arrays", None)
    if current is not None:
        current = from_record(current) if not isinstance(current, dict) else current
        np.testing.assert_allclose(current["lora_A"], out)


def test_a_node_with_an_empty_partition_is_left_out_of_sampling():
    """Its reply (num-examples 0, empty-partition 1) neither fails the round nor is averaged, and
    the node is not sampled again; the minimums shrink by the empty nodes."""
    strategy = AdapterFedAvg(min_train_nodes=3, min_available_nodes=3, fraction_train=1.0)
    glob = {"lora_A": np.zeros((2, 3), np.float32)}
    sent = list(strategy.configure_train(1, to_record(glob), ConfigRecord(), FakeGrid()))
    assert len(sent) == 3
    empty = Message(
        RecordDict(
            {
                "arrays": to_record(glob),
                "metrics": MetricRecord(
                    {"num-examples": 0, "train-loss": 0.0, "partition-id": 2, "empty-partition": 1}
                ),
            }
        ),
        reply_to=sent[2],
    )
    replies = [
        reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
        reply(sent[1], {"lora_A": np.full((2, 3), 3.0, np.float32)}, 10, 1),
        empty,
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(from_record(arrays)["lora_A"], 2.0)
    assert strategy.dropped == [] and strategy.empty_nodes == {sent[2].metadata.dst_node_id}
    again = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid()))
    assert sorted(m.metadata.dst_node_id for m in again) == sorted(
        n for n in FakeGrid().get_node_ids() if n not in strategy.empty_nodes
    )
    inner = strategy.strategy
    assert (inner.min_train_nodes, inner.min_available_nodes) == (3, 3)  # restored after sampling


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5, 0])
def test_a_non_finite_or_non_positive_weight_drops_the_reply_not_the_round(bad):
    """NaN <= 0 is False: a NaN num-examples used to pass and turn the global adapter into NaN."""

    def replies(sent):
        return [
            reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
            reply(sent[1], {"lora_A": np.full((2, 3), 3.0, np.float32)}, 30, 1),
            reply(sent[2], {"lora_A": np.full((2, 3), 5.0, np.float32)}, bad, 2),
        ]

    strategy, (arrays, _) = run_round(replies)
    np.testing.assert_allclose(from_record(arrays)["lora_A"], 2.5)
    assert len(strategy.dropped) == 1 and "num-examples" in strategy.dropped[0][1]
    rows = strategy.stats[0].clients
    assert [r["partition-id"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"partition-id": 0, "num-examples": 10, "train-loss": 1.0, "bytes": 24}
    assert rows[2]["bytes"] == 0 and "num-examples" in rows[2]["dropped"]


def test_client_weight_is_its_partition_size_unless_examples_seen():
    from fedmllm.client.rounds import aggregation_weight

    assert aggregation_weight({}, 37, 12) == 37  # default: partition_size
    assert aggregation_weight({"weight_by": "examples_seen"}, 37, 12) == 12
    assert aggregation_weight({"weight_by": "examples_seen"}, 0, 0) == 0  # an empty partition
    with pytest.raises(ValueError, match="train.weight_by='size'"):
        aggregation_weight({"weight_by": "size"}, 37, 12)


def _corrupt(msg: Message) -> Message:
    """The reply's array bytes cut short (a transfer gone wrong)."""
    from flwr.app import Array, ArrayRecord

    arr = msg.content["arrays"]["lora_A"]
    msg.content["arrays"] = ArrayRecord(
        {"lora_A": Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data[: len(arr.data) // 2])}
    )
    return msg


def _other_stype(msg: Message) -> Message:
    from flwr.app import Array, ArrayRecord

    arr = msg.content["arrays"]["lora_A"]
    msg.content["arrays"] = ArrayRecord(
        {"lora_A": Array(dtype=arr.dtype, shape=arr.shape, stype="torch.Tensor", data=b"\x00" * 24)}
    )
    return msg


def _extra_metric(msg: Message) -> Message:
    msg.content["metrics"]["sneaky"] = 1.0
    return msg


def _two_metric_records(msg: Message) -> Message:
    msg.content["more"] = MetricRecord({"num-examples": 10})
    return msg


@pytest.mark.parametrize(
    "spoil,reason",
    [
        (_corrupt, "unreadable reply"),
        (_other_stype, "unreadable reply"),
        (_extra_metric, r"metric keys differ .*unexpected \['sneaky'\]"),
        (_two_metric_records, "2 MetricRecords"),
    ],
)
@pytest.mark.parametrize("position", [0, 2])  # the odd reply first or last: the others still aggregate
def test_a_malformed_reply_is_dropped_with_its_reason_and_the_round_goes_on(spoil, reason, position):
    import re

    def replies(sent):
        out = [
            reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
            reply(sent[1], {"lora_A": np.full((2, 3), 3.0, np.float32)}, 30, 1),
            reply(sent[2], {"lora_A": np.full((2, 3), 3.0, np.float32)}, 30, 2),
        ]
        out[position] = spoil(out[position])
        return out

    strategy, (arrays, metrics) = run_round(replies)
    expected = {0: 3.0, 2: (10 * 1.0 + 30 * 3.0) / 40}[position]
    np.testing.assert_allclose(from_record(arrays)["lora_A"], expected)
    assert len(strategy.dropped) == 1 and re.search(reason, strategy.dropped[0][1])
    row = [r for r in strategy.stats[0].clients if r["partition-id"] == position][0]
    assert re.search(reason, row["dropped"]) and row["bytes"] == 0


def test_max_update_norm_drops_a_reply_whose_update_is_too_large_and_names_its_norm():
    def replies(sent):
        return [
            reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
            reply(sent[1], {"lora_A": np.full((2, 3), 1e30, np.float32)}, 10, 1),
            reply(sent[2], {"lora_A": np.full((2, 3), 2.0, np.float32)}, 10, 2),
        ]

    strategy = AdapterFedAvg(min_train_nodes=2, min_available_nodes=3, fraction_train=1.0, max_update_norm=10.0)
    sent = list(
        strategy.configure_train(1, to_record({"lora_A": np.zeros((2, 3), np.float32)}), ConfigRecord(), FakeGrid())
    )
    arrays, _ = strategy.aggregate_train(1, replies(sent))
    np.testing.assert_allclose(from_record(arrays)["lora_A"], 1.5)  # ||1e30 x 6|| dropped; ||2 x 6|| = 4.9 kept
    assert strategy.dropped[0][1] == "update norm 2.449e+30 > aggregator.max_update_norm=10"
    with pytest.raises(ValueError, match="aggregator.max_update_norm=-1 must be null or a number > 0"):
        AdapterFedAvg(max_update_norm=-1)


def test_max_num_examples_drops_a_reply_that_claims_more_examples_than_any_client_holds():
    def replies(sent):
        return [
            reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
            reply(sent[1], {"lora_A": np.full((2, 3), 9.0, np.float32)}, 10**12, 1),
            reply(sent[2], {"lora_A": np.full((2, 3), 2.0, np.float32)}, 10, 2),
        ]

    strategy = AdapterFedAvg(min_train_nodes=2, min_available_nodes=3, fraction_train=1.0, max_num_examples=5000)
    sent = list(
        strategy.configure_train(1, to_record({"lora_A": np.zeros((2, 3), np.float32)}), ConfigRecord(), FakeGrid())
    )
    arrays, _ = strategy.aggregate_train(1, replies(sent))
    np.testing.assert_allclose(from_record(arrays)["lora_A"], 1.5)  # without the bound: 9.0 (weight 1e12)
    assert strategy.dropped[0][1] == "num-examples=1000000000000 > aggregator.max_num_examples=5000"


def test_an_error_reply_is_dropped_with_its_code_and_the_round_goes_on():
    """A client whose ClientApp raised: Flower delivers a Message with an Error; it is named in the
    round's client rows and the valid replies still aggregate."""
    from flwr.app import Error

    def replies(sent):
        return [
            reply(sent[0], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, 0),
            reply(sent[1], {"lora_A": np.full((2, 3), 3.0, np.float32)}, 30, 1),
            Message(Error(code=0, reason="ClientApp raised ValueError"), reply_to=sent[2]),
        ]

    strategy, (arrays, _) = run_round(replies)
    np.testing.assert_allclose(from_record(arrays)["lora_A"], 2.5)
    assert strategy.dropped == [(1, "error reply (code 0: ClientApp raised ValueError)")]
    assert [r.get("dropped") for r in strategy.stats[0].clients] == [None, None, strategy.dropped[0][1]]


def test_records_beside_the_adapter_go_only_to_a_strategy_that_checks_them():
    """FedAvg reads the adapter alone: a reply's other records are removed before Flower's strategy
    sees it (Flower expects one ArrayRecord); SCAFFOLD drops a reply without its `scaffold-dc`."""
    from fedmllm.strategies.wrapper import AdapterStrategy

    def replies(sent):
        out = [reply(sent[i], {"lora_A": np.full((2, 3), 1.0, np.float32)}, 10, i) for i in range(3)]
        out[0].content["scaffold-dc"] = to_record({"lora_A": np.zeros((2, 3), np.float32)})
        return out

    strategy, (arrays, _) = run_round(replies)
    np.testing.assert_allclose(from_record(arrays)["lora_A"], 1.0)
    assert strategy.dropped == [] and strategy.stats[0].bytes_up_per_client == {0: 48, 1: 24, 2: 24}

    scaffold = AdapterStrategy(
        algorithm_class("scaffold")().strategy_class()(min_train_nodes=2, min_available_nodes=3, fraction_train=1.0)
    )
    sent = list(
        scaffold.configure_train(1, to_record({"lora_A": np.zeros((2, 3), np.float32)}), ConfigRecord(), FakeGrid())
    )
    assert all("scaffold-c" in m.content.array_records for m in sent)
    arrays, _ = scaffold.aggregate_train(1, replies(sent))
    assert arrays is None  # one reply with dc, two without: fewer than min_train_nodes=2 valid
    assert [r for _, r in scaffold.dropped] == [
        "no 'scaffold-dc' record: the client does not run aggregator=scaffold"
    ] * 2
