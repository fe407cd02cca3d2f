"""Run a composed config as a Flower simulation in this process (Ray backend)."""

from __future__ import annotations

import logging
import os
from typing import Any


def quiet_flower_env() -> None:
    """No telemetry, no update checks (no network here)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Simulation workers inherit the environment: keep library deprecation chatter out of the log.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")


def run_simulation(cfg: dict[str, Any], overrides: tuple[str, ...]) -> None:
    """Simulate `cfg['num_clients']` SuperNodes; the apps compose the same config from `overrides`."""
    quiet_flower_env()
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedmllm.data import load_task
    from fedmllm.partitioning.materialise import empty_clients, warn_empty

    warn_empty(empty_clients(cfg, load_task(cfg["dataset"], cfg["seed"])[1]))  # up front, not mid-round

    from fedmllm.client.app import make_client_app
    from fedmllm.server.app import make_server_app

    backend = {
        "client_resources": {"num_cpus": cfg["client_cpus"], "num_gpus": cfg["client_gpus"]},
        "init_args": {"include_dashboard": False, "num_cpus": max(os.cpu_count() or 1, cfg["client_cpus"])},
    }
    flwr_logger = logging.getLogger("flwr")
    hide = _HideDeprecation()
    flwr_logger.addFilter(hide)  # run_simulation's notice points users at `flwr run`; `fedmllm run` is ours
    try:
        flwr_run_simulation(
            server_app=make_server_app(overrides),
            client_app=make_client_app(overrides),
            num_supernodes=cfg["num_clients"],
            backend_config=backend,
        )
    finally:
        flwr_logger.removeFilter(hide)


class _HideDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()
