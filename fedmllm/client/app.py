"""Flower ClientApp: read the Context, run fedmllm.client.train_request (in this process, or in
the SuperNode's long-lived worker in deployment: fedmllm.client.worker), build the reply."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from fedmllm.client import TrainRequest, train_request, worker
from fedmllm.config import node_identity
from fedmllm.privacy import CONFIG_KEY
from fedmllm.records import from_record, to_record

STATE_KEY = "fedmllm-client-state"  # what a client keeps across rounds (SCAFFOLD c_k, FedSA-LoRA B_k)


def make_client_app(base_overrides: tuple[str, ...] = ()) -> ClientApp:
    """A ClientApp whose config is `base_overrides` + the run_config's overrides."""
    app = ClientApp(mods=[privacy_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, base_overrides)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, base_overrides, evaluate=True)

    return app


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's clipping mod when a DP run's server asks for one (train config `dp-clipping`:
    fixed -> fixedclipping_mod, adaptive -> adaptiveclipping_mod): the update is clipped to the
    server's clipping norm before it leaves this client. Other messages pass untouched."""
    config = msg.content.config_records.get("config")
    how = config.get(CONFIG_KEY) if config is not None else None
    if how == "fixed":
        return fixedclipping_mod(msg, context, call_next)
    if how == "adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def handle_train(
    msg: Message, context: Context, base_overrides: tuple[str, ...] = (), evaluate: bool = False
) -> Message:
    """One train message: run the client's round, reply (and keep its state). `evaluate`: an
    evaluate message (eval.client_fraction): evaluate the client's model on its held-out split and
    reply with the metrics alone."""

    node_identity(context.node_config)  # first: a misconfigured SuperNode fails in a second
    saved = context.state.array_records.get(STATE_KEY)
    request = TrainRequest(
        run_config=dict(context.run_config),
        node_config=dict(context.node_config),
        arrays=from_record(msg.content["arrays"]),
        config=dict(msg.content["config"]),
        extra={k: from_record(v) for k, v in msg.content.array_records.items() if k != "arrays"},
        state=from_record(saved) if saved is not None else None,
        base_overrides=tuple(base_overrides),
        evaluate=evaluate,
    )
    if worker.wanted(context.node_config):
        out, metrics, extra_out, state = worker.call(request)
    else:
        out, metrics, extra_out, state = train_request(request)
    if evaluate:
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    if state:
        context.state[STATE_KEY] = to_record(state)
    if set(out) == set(request.arrays):  # the reply in the order it was sent (Flower's clipping mods compare it)
        out = {k: out[k] for k in request.arrays}
    content = RecordDict(
        {"arrays": to_record(out), "metrics": MetricRecord(metrics), **{k: to_record(v) for k, v in extra_out.items()}}
    )
    return Message(content=content, reply_to=msg)


app = make_client_app()
