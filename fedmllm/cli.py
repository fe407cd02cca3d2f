"""`fedmllm` console script: run | report."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: fedmllm <command> [args]

commands:
  run [hydra overrides]     federated fine-tuning as a Flower simulation
                            (e.g. fedmllm run model=tiny-llava num_rounds=2; -m for sweeps)
  report RUN_DIR            print a run's metrics table and (re)draw its plot
  report MULTIRUN_DIR       a sweep's results table (report.md, report.csv) and plot (report.png);
                            --metric NAME picks the plotted metric (default accuracy)
"""


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _run(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from fedmllm.config import ConfigError, compose
    from fedmllm.models.build import MissingAssetError

    @hydra.main(version_base="1.3", config_path="pkg://fedmllm.conf", config_name="config")
    def job(_: DictConfig) -> None:
        hc = HydraConfig.get()
        overrides = tuple(hc.overrides.task) + (f"out_dir='{hc.runtime.output_dir}'",)
        try:
            cfg = compose(overrides)
            preflight(cfg)
        except (ConfigError, MissingAssetError) as err:
            _fail(str(err))
        from fedmllm.simulation import run_simulation

        try:
            run_simulation(cfg, overrides)
        except Exception as err:  # noqa: BLE001 - the cause is printed; partial results stay on disk
            cause = err.__cause__ or err
            print(f"run dir: {hc.runtime.output_dir} (incomplete)", flush=True)
            _fail(f"the run failed: {type(cause).__name__}: {cause}")
        print(f"run dir: {hc.runtime.output_dir}", flush=True)

    sys.argv = ["fedmllm run", *argv]
    job()


def preflight(cfg: dict) -> None:
    """Check offline assets before starting workers, so a missing one fails in one short line."""
    from fedmllm.data import easyvqa

    if cfg["model"].get("builder") == "smollm2":
        from fedmllm.models.build import smollm2_gguf_path

        smollm2_gguf_path()
    if cfg["dataset"]["name"].startswith("easyvqa"):
        easyvqa._easy_vqa()


def _report(argv: list[str]) -> None:
    from pathlib import Path

    from fedmllm.tracking import format_round, plot_run, read_metrics
    from fedmllm.tracking.report import is_multirun, write_report

    p = argparse.ArgumentParser(prog="fedmllm report")
    p.add_argument("run_dir", type=Path, help="a run dir, or a sweep's multirun dir (its jobs in 0/, 1/, ...)")
    p.add_argument("--metric", default="accuracy", help="sweep: metric of the plot and the best-round column")
    args = p.parse_args(argv)
    if (args.run_dir / "metrics.jsonl").is_file():
        for row in read_metrics(args.run_dir):
            print(format_round(row))
        print(f"plot: {plot_run(args.run_dir)}")
    elif is_multirun(args.run_dir):
        try:
            markdown, paths = write_report(args.run_dir, args.metric)
        except ValueError as err:
            _fail(str(err))
        print(markdown)
        print(f"table: {paths['md']}\ncsv: {paths['csv']}\nplot: {paths['png']}")
    else:
        _fail(f"{args.run_dir} has no metrics.jsonl and no job subdirs (0/, 1/, ...); pass the 'run dir:' "
              "a run printed, or the sweep dir of `fedmllm run -m` (multirun/<date>/<time>)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from fedmllm.simulation import quiet_flower_env

    quiet_flower_env()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        _run(rest)
    elif cmd == "report":
        _report(rest)
    else:
        _fail(f"unknown command {cmd!r}\n{USAGE}")


if __name__ == "__main__":
    main()
