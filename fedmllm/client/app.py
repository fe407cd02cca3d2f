"""Flower ClientApp: read the Context, run fedmllm.client.rounds.train_request (in this process, or in
the SuperNode's long-lived worker in deployment: fedmllm.client.worker), build the reply."""

from __future__ import annotations

import json

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from fedmllm.client import worker
from fedmllm.client.request import TrainRequest
from fedmllm.config import node_identity
from fedmllm.privacy import CONFIG_KEY, SECURE_KEYS
from fedmllm.records import from_record, to_record

STATE_KEY = "fedmllm-client-state"  # what a client keeps across rounds (SCAFFOLD c_k, FedSA-LoRA B_k)


def make_client_app(base_overrides: tuple[str, ...] = ()) -> ClientApp:
    """A ClientApp whose config is `base_overrides` + the run_config's overrides."""

    def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """A secure aggregation run's train messages (SecAgg+'s stages): Flower's secaggplus_mod,
        whose masking stage runs this client's round (`secure_train`); other messages pass."""
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        return secaggplus_mod(msg, context, lambda m, c: secure_train(m, c, base_overrides))

    app = ClientApp(mods=[secure_mod, privacy_mod])

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


def run_request(context: Context, arrays, config, extra, base_overrides=(), evaluate: bool = False):
    """Run the client's round (or evaluation) on what a message carried, in this process or the
    node's worker, keeping its state in the Context: (adapter, metrics, extra records)."""
    node_identity(context.node_config)  # first: a misconfigured SuperNode fails in a second
    saved = context.state.array_records.get(STATE_KEY)
    request = TrainRequest(
        run_config=dict(context.run_config),
        node_config=dict(context.node_config),
        arrays=arrays,
        config=config,
        extra=extra,
        state=from_record(saved) if saved is not None else None,
        base_overrides=tuple(base_overrides),
        evaluate=evaluate,
    )
    if worker.wanted(context.node_config):
        out, metrics, extra_out, state = worker.call(request)
    else:  # imported here: a deployment's one-message processes hand the request to the worker
        from fedmllm.client.rounds import train_request

        out, metrics, extra_out, state = train_request(request)
    if state and not evaluate:
        context.state[STATE_KEY] = to_record(state)
    return out, metrics, extra_out


def handle_train(
    msg: Message, context: Context, base_overrides: tuple[str, ...] = (), evaluate: bool = False
) -> Message:
    """One train message: run the client's round, reply (and keep its state). `evaluate`: an
    evaluate message (eval.client_fraction): evaluate the client's model on its held-out split and
    reply with the metrics alone."""
    sent = from_record(msg.content["arrays"])
    extra = {k: from_record(v) for k, v in msg.content.array_records.items() if k != "arrays"}
    out, metrics, extra_out = run_request(context, sent, dict(msg.content["config"]), extra, base_overrides, evaluate)
    if evaluate:
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    if set(out) == set(sent):  # the reply in the order it was sent (Flower's clipping mods compare it)
        out = {k: out[k] for k in sent}
    content = RecordDict(
        {"arrays": to_record(out), "metrics": MetricRecord(metrics), **{k: to_record(v) for k, v in extra_out.items()}}
    )
    return Message(content=content, reply_to=msg)


app = make_client_app()


def secure_train(msg: Message, context: Context, base_overrides: tuple[str, ...] = ()) -> Message:
    """SecAgg+'s masking stage (under secaggplus_mod): the legacy FitIns the workflow sent (the
    global adapter, in the order of the key list strategies.secure put in its config) -> this
    client's round -> a FitRes whose adapter the mod masks. Its weight is 1 (0 with nothing
    trained): the server gets the plain mean. Under privacy=dp_client_fixed the update is clipped
    here, before masking (Flower's fixedclipping_mod cannot read legacy messages)."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop(SECURE_KEYS)))
    sent = dict(zip(keys, parameters_to_ndarrays(fitins.parameters)))
    out, metrics, _ = run_request(context, sent, config, {}, base_overrides)
    values = [out[k] for k in keys]
    if config.get(CONFIG_KEY) == "fixed":
        compute_clip_model_update(values, [sent[k] for k in keys], float(config[KEY_CLIPPING_NORM]))
    weight = 0 if metrics.get("empty-partition") else 1
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(values), weight, dict(metrics))
    return Message(content=fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
