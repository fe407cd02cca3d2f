"""Flower ServerApp: compose the config from run_config, then hand over to fedmllm.server.run."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmllm.config import from_run_config
from fedmllm.server.run import run_server


def make_server_app(base_overrides: tuple[str, ...] = ()) -> ServerApp:
    """A ServerApp whose config is `base_overrides` + the run_config's overrides."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, from_run_config(context.run_config, base_overrides))

    return app


app = make_server_app()
