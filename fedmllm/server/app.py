"""Flower ServerApp: compose the config from run_config, then hand over to fedmllm.server.run."""

from __future__ import annotations

import time
from logging import INFO
from typing import Iterable

from flwr.app import Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmllm.config import from_run_config
from fedmllm.server.run import run_server

# seconds between the ServerApp's pulls for replies (a SuperNode checks for its reply every 0.5 s)
PULL_INTERVAL = 0.5


class PollingGrid(Grid):
    """The ServerApp's grid, pulling replies every `interval` seconds instead of Flower's 3.

    Flower 1.42's deployment grid sleeps 3 s between pulls, so every message round trip ends up to
    3 s after its last reply arrived: once a round for plain training, four times for SecAgg+'s
    four stages (docs/benchmarks.md "Secure aggregation"). Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL):
        self.grid, self.interval = grid, interval

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull until every reply is in or `timeout` seconds have passed."""
        messages = list(messages)
        kinds = sorted({m.metadata.message_type for m in messages})
        start = time.monotonic()
        pending = set(self.push_messages(messages))
        sent = len(pending)
        end = None if timeout is None else start + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval if end is None else max(0.0, min(self.interval, end - time.monotonic())))
        # where a round's time goes: each message round trip, from the push to the last reply
        if sent:
            log(
                INFO,
                "%s: %d of %d replies in %.1f s",
                "/".join(kinds),
                sent - len(pending),
                sent,
                time.monotonic() - start,
            )
        return replies


def make_server_app(base_overrides: tuple[str, ...] = ()) -> ServerApp:
    """A ServerApp whose config is `base_overrides` + the run_config's overrides."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(PollingGrid(grid), from_run_config(context.run_config, base_overrides))

    return app


app = make_server_app()
