"""Run a composed config as a Flower simulation in this process (Ray backend)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from fedmllm import data as sources  # sources.load_task is looked up on each call (tests replace it)
from fedmllm.conf import run_settings
from fedmllm.partitioning.materialise import empty_clients, warn_empty


def quiet_flower_env() -> None:
    """No telemetry, no update checks (no network here)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Simulation workers inherit the environment: keep library deprecation chatter out of the log.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")


def run_simulation(cfg: dict[str, Any], overrides: tuple[str, ...]) -> None:
    """Simulate `num_clients` SuperNodes; the apps compose the same config from `overrides`."""
    quiet_flower_env()
    # Flower is imported here, once its environment is set.
    import flwr.simulation  # its run_simulation looked up on each call (tests replace it)

    from fedmllm.client.app import make_client_app
    from fedmllm.server.app import make_server_app

    run = run_settings(cfg)
    warn_empty(empty_clients(cfg, sources.load_task(run.dataset, run.seed)[1]))  # up front, not mid-round

    verbose = bool(run.verbose)
    init_args: dict[str, Any] = {"include_dashboard": False, "num_cpus": max(os.cpu_count() or 1, run.client_cpus)}
    if not verbose:  # the clients' output stays in Ray's session logs, Ray's own in run.log
        init_args.update(log_to_driver=False, logging_level=logging.ERROR)
    backend = {
        "client_resources": {"num_cpus": run.client_cpus, "num_gpus": client_gpus(run.client_gpus)},
        "init_args": init_args,
    }
    flwr_logger = logging.getLogger("flwr")
    hide = _HideDeprecation()
    flwr_logger.addFilter(hide)  # run_simulation's notice points users at `flwr run`; `fedmllm run` is ours
    # flwr.simulation.run_simulation is deprecated for `flwr run`, which has no in-process form: it
    # starts a SuperLink and reads the app from a FAB. `fedmllm run` needs one process that composes
    # the config, runs Hydra sweeps and stops on Ctrl-C, so it keeps the in-process simulation.
    try:
        with run_log(run.out_dir, verbose):
            flwr.simulation.run_simulation(
                server_app=make_server_app(overrides),
                client_app=make_client_app(overrides),
                num_supernodes=run.num_clients,
                backend_config=backend,
            )
    finally:
        flwr_logger.removeFilter(hide)


def client_gpus(setting: float | None) -> float:
    """GPUs Ray gives each simulated client: the `client_gpus` setting, or when it is null 1.0 if
    CUDA devices are visible (one client per GPU; with 0, Ray hides the GPUs and clients train on
    the CPU)."""
    if setting is not None:
        return float(setting)
    import torch

    return 1.0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 0.0


@contextlib.contextmanager
def run_log(run_dir: str | None, verbose: bool = False):
    """Every log record (Flower's, Ray's, the libraries') and every Python warning go to
    `<run dir>/run.log`; the console keeps our round lines, progress bars and errors, unless
    `verbose` (Flower's console output and the warnings on the console too)."""
    if not run_dir:
        yield None
        return
    path = Path(run_dir) / "run.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # the root logger collects what propagates (flwr, py.warnings, bitsandbytes, ...); Ray's does not propagate
    targets = [logging.getLogger(), logging.getLogger("ray")]
    for lg in targets:
        lg.addHandler(handler)
    flwr_console = [h for h in logging.getLogger("flwr").handlers if not isinstance(h, logging.FileHandler)]
    levels = [(h, h.level) for h in flwr_console]
    if not verbose:
        for h in flwr_console:
            h.setLevel(logging.ERROR)  # Flower's console handler: errors only
        logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger -> run.log only
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        for lg in targets:
            lg.removeHandler(handler)
        for h, level in levels:
            h.setLevel(level)
        handler.close()


class _HideDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()
