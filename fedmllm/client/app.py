"""Flower ClientApp: read the Context, call fedmllm.client.train_round, build the reply."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmllm.config import from_run_config, node_identity
from fedmllm.records import from_record, to_record


def make_client_app(base_overrides: tuple[str, ...] = ()) -> ClientApp:
    """A ClientApp whose config is `base_overrides` + the run_config's overrides."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedmllm.client import train_round

        cfg = from_run_config(context.run_config, base_overrides)
        ident = node_identity(context.node_config)
        arrays = from_record(msg.content["arrays"])
        config = msg.content["config"]
        out, metrics = train_round(
            cfg, ident, arrays, int(config["server-round"]), float(config.get("proximal-mu", 0.0))
        )
        content = RecordDict({"arrays": to_record(out), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
