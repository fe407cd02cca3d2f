"""Flower ClientApp: read the Context, call fedmllm.client.train_round, build the reply."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmllm.client.algorithms import ClientStore, client_state_path
from fedmllm.config import from_run_config, node_identity
from fedmllm.records import from_record, to_record

STATE_KEY = "fedmllm-client-state"  # what a client keeps across rounds (SCAFFOLD c_k, FedSA-LoRA B_k)


def make_client_app(base_overrides: tuple[str, ...] = ()) -> ClientApp:
    """A ClientApp whose config is `base_overrides` + the run_config's overrides."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, base_overrides)

    return app


def handle_train(msg: Message, context: Context, base_overrides: tuple[str, ...] = ()) -> Message:
    """One train message: compose the config, run the client's round, reply (and keep its state)."""
    from fedmllm.client import train_round

    ident = node_identity(context.node_config)  # first: a misconfigured SuperNode fails in a second
    cfg = from_run_config(context.run_config, base_overrides)
    arrays = from_record(msg.content["arrays"])
    extra = {k: from_record(v) for k, v in msg.content.array_records.items() if k != "arrays"}
    config = msg.content["config"]
    saved = context.state.array_records.get(STATE_KEY)
    store = ClientStore(from_record(saved) if saved is not None else None,
                        client_state_path(cfg, ident.partition_id))
    out, metrics, extra_out = train_round(
        cfg, ident, arrays, int(config["server-round"]), float(config.get("proximal-mu", 0.0)), extra, store
    )
    if store.flat:
        context.state[STATE_KEY] = to_record(store.flat)
    content = RecordDict({"arrays": to_record(out), "metrics": MetricRecord(metrics),
                          **{k: to_record(v) for k, v in extra_out.items()}})
    return Message(content=content, reply_to=msg)


app = make_client_app()
