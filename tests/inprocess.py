"""A Flower Grid that delivers each message to the real ClientApp handler in this process.

The server side (fedmllm.server.run.run_server with its strategy) and the client side
(the ClientApp of fedmllm.client.app, its mods included) run unchanged; only Ray and
the SuperLink are left out, so every aggregator's full round trip fits in a few seconds.
Node contexts (Context.state) persist across rounds, as a SuperNode's do.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from flwr.app import Context, RecordDict
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    def __init__(self, num_nodes: int, overrides: tuple[str, ...], node_config: dict | None = None):
        self.overrides = tuple(overrides)
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={"overrides": ""},
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from fedmllm.client.app import make_client_app

        app = make_client_app(self.overrides)  # the ClientApp with its mods (privacy's clipping, SecAgg+)
        # each node gets its own copy, as over the wire: Flower's workflows share one RecordDict
        # between messages, and SecAgg+'s client mod consumes entries of it
        return [app(copy.deepcopy(m), self.contexts[m.metadata.dst_node_id]) for m in messages]

    # The strategies use only the two methods above.
    def set_run(self, run_id):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError


@contextmanager
def task_identity():
    """Messages need a run identity, as inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, k) for k in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(TaskIdentity, k, v)


def run_in_process(overrides: list[str]):
    """Compose `overrides`, run all rounds through InProcessGrid; returns the run dir."""
    from fedmllm.config import compose
    from fedmllm.server.run import run_server

    cfg = compose(overrides)
    with task_identity():
        return run_server(InProcessGrid(cfg["num_clients"], tuple(overrides)), cfg)


def three_client_rows(out, *extra: str) -> list[dict]:
    """A 2-round run of tiny-llava on 3 IID clients (all sampled, no server stages, 4 held-out
    samples) with `extra` overrides, in `out`; its metrics.jsonl rows."""
    import json

    from conftest import tiny_overrides

    run_in_process(
        tiny_overrides(
            "num_clients=3",
            "clients_per_round=3",
            "partitioner=iid",
            "num_rounds=2",
            "server_stage=none",
            "dataset.eval_samples=4",
            f"out_dir={out}",
            *extra,
        )
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
