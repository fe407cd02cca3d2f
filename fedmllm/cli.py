"""`fedmllm` console script: run | partition | inspect | evaluate | export | report."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fedmllm.common import MissingAssetError
from fedmllm.config import ConfigError, compose, unknown_setting
from fedmllm.data import DataError, check_source, easyvqa
from fedmllm.models.build import smollm2_gguf_path
from fedmllm.models.inspection import footprint, format_footprint
from fedmllm.models.load import family_of
from fedmllm.models.memory import format_memory, image_token_counter, predict_peak
from fedmllm.partitioning.materialise import format_stats, warn_empty, write_partitions
from fedmllm.server.checkpoint import checkpoint_dir, export_checkpoint, latest_state
from fedmllm.server.evaluate import evaluate_checkpoint, run_config
from fedmllm.tracking import format_round, plot_run, read_metrics
from fedmllm.tracking.report import is_multirun, write_report

USAGE = """usage: fedmllm <command> [args]

commands:
  run [hydra overrides]     federated fine-tuning as a Flower simulation
                            (e.g. fedmllm run model=tiny-llava num_rounds=2; -m for sweeps;
                            resume=RUN_DIR continues a stopped run from its last checkpoint)
  partition [overrides] out=DIR
                            write every client's samples under DIR/<dataset>/<scenario>/partition-...
                            (e.g. fedmllm partition partitioner=fedmllm scenario=missing num_clients=10 out=data)
  inspect [overrides]       parameters per module group, trainable adapter, MB per client per round,
                            and the predicted peak GPU memory of a client's training step at
                            train.batch_size, with and without gradient checkpointing
                            (meta device: no weights read or downloaded; e.g. fedmllm inspect
                            model=llava-1.5-7b peft=dora train.batch_size=4; aggregator=... shows
                            its protocol's bytes)
  evaluate RUN_DIR|CHECKPOINT_DIR [round=N] [overrides]
                            evaluate a run's checkpoint (default: its last intact round) on its
                            held-out split, as the run did or with overrides (e.g. eval.mode=generate
                            dataset.eval_samples=500); writes RUN_DIR/eval/round-N.json
  export RUN_DIR|CHECKPOINT_DIR out=DIR [round=N] [merge=true|false] [dtype=float32|bfloat16|float16]
                            a run's checkpoint as a standalone Hugging Face model: the base at full
                            precision with the server's stage-1 tower, the adapter merged in (or in
                            DIR/adapter with merge=false) and the processor; from_pretrained(DIR) loads it
  report RUN_DIR            print a run's metrics table and (re)draw its plot
  report MULTIRUN_DIR...    a sweep's results table (report.md, report.csv) and plot (report.png);
                            several sweep dirs make one report (--out DIR: where it goes);
                            --metric NAME picks the plotted metric (default accuracy)
"""


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _run(argv: list[str]) -> None:

    from fedmllm.server.run import ResumeError

    failed: list[str] = []  # a sweep's failed jobs: the sweep goes on, and exits 2 at its end

    @hydra.main(version_base="1.3", config_path="pkg://fedmllm.conf", config_name="config")
    def job(_: DictConfig) -> float | None:
        """One run; returns its final held-out accuracy (what a Hydra sweeper such as Optuna's maximizes)."""

        hc = HydraConfig.get()
        out_dir = hc.runtime.output_dir
        if hc.mode == RunMode.MULTIRUN:
            try:
                return one_job(hc, out_dir)
            except SystemExit as stop:  # _fail printed the reason; the other jobs still run
                if stop.code:
                    failed.append(f"{hc.job.num} ({out_dir})")
            return None
        return one_job(hc, out_dir)

    def one_job(hc, out_dir: str) -> float | None:
        overrides = tuple(hc.overrides.task)
        resume = _override(overrides, "resume")
        if resume:
            overrides, out_dir = resume_overrides(resume, overrides), resume
        given = _override(overrides, "out_dir")
        if given and not resume:  # out_dir= wins over Hydra's dir (they differ only with hydra.run.dir= too)
            out_dir = given
        overrides += (f"out_dir='{out_dir}'",)
        try:
            cfg = compose(overrides)
            preflight(cfg)
        except (ConfigError, DataError, MissingAssetError) as err:
            _fail(str(err))
        from fedmllm.simulation import run_simulation

        print(
            f"run dir: {out_dir}  (full log: {Path(out_dir) / 'run.log'}"
            f"{'' if cfg.get('verbose') else '; verbose=true shows it here'})",
            flush=True,
        )
        stop_on_signals(out_dir)
        try:
            run_simulation(cfg, overrides)
        except Exception as err:  # noqa: BLE001 - the cause is printed; partial results stay on disk
            cause = err.__cause__ or err
            if isinstance(cause, ResumeError):
                _fail(str(cause))
            print(f"run dir: {out_dir} (incomplete{resume_hint(out_dir, cause)})", flush=True)
            _fail(f"the run failed: {type(cause).__name__}: {cause}")
        print(f"run dir: {out_dir}", flush=True)
        return final_accuracy(out_dir)

    problem = unknown_setting([a for a in argv if "=" in a and not a.startswith("-")])
    if problem:  # before Hydra, whose message for it is five lines
        _fail(problem)
    resume, out_dir = _override(argv, "resume"), _override(argv, "out_dir")
    run_dir_given = _override(argv, "hydra.run.dir") is not None
    if resume and not Path(resume).is_dir():  # before Hydra creates it as the run dir
        _fail(f"resume={resume}: no such directory; pass the 'run dir:' a stopped run printed")
    if resume and not run_dir_given:
        # continue in the stopped run's dir, and keep its .hydra/overrides.yaml as it was
        argv = [*argv, f"hydra.run.dir={resume}", "hydra.output_subdir=null"]
    elif out_dir:
        if any(a in ("-m", "--multirun") for a in argv):
            _fail(
                f"out_dir={out_dir} would give every job of the sweep the same directory; "
                f"use hydra.sweep.dir={out_dir} instead (job i writes to {out_dir}/i)"
            )
        if not run_dir_given:  # the run's files and Hydra's .hydra/ + log in the one directory asked for
            argv = [*argv, f"hydra.run.dir={out_dir}"]
    sys.argv = ["fedmllm run", *argv]
    job()
    if failed:
        _fail(
            f"{len(failed)} job(s) of the sweep failed: {', '.join(failed)}; the others finished "
            "(fedmllm report <sweep dir> marks the failed ones)"
        )


def final_accuracy(run_dir: str) -> float | None:
    """The last evaluated round's held-out accuracy of a run, or None."""

    try:
        rows = read_metrics(Path(run_dir))
    except (OSError, ValueError):
        return None
    scored = [r["accuracy"] for r in rows if isinstance(r.get("accuracy"), (int, float))]
    return float(scored[-1]) if scored else None


def stop_on_signals(run_dir: str) -> None:
    """SIGINT (Ctrl-C) and SIGTERM end the run within seconds: a line saying what is kept, Ray's
    processes stopped (no worker left behind), exit 128 + the signal. Flower's simulation runs the
    server in a thread, so a KeyboardInterrupt in the main thread alone left the process running.
    Every round that was checkpointed stays (checkpoints and metrics rows are written whole).

    Ray is not shut down from inside: while `ray.shutdown()` ran, Flower's thread could still call
    into Ray, whose core worker then ends the process itself with exit 1. The handler instead
    hands the PIDs of every process this run started (Ray's daemons and workers) to a small
    reaper, exits at once, and the reaper kills them when this process is gone. The reaper keeps
    stdout/stderr open, so a caller that reads them to the end also waits for the cleanup."""

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping; the rounds checkpointed so far stay in {run_dir}"
            f"{resume_hint(run_dir, KeyboardInterrupt())}",
            file=sys.stderr,
            flush=True,
        )
        if not os.path.isdir("/proc"):  # no process tree to read (macOS): Ray's own shutdown, racy as it is
            _shutdown_ray()
        try:
            pids = descendants(os.getpid())
            if pids:
                subprocess.Popen(
                    [sys.executable, "-c", _REAPER, str(os.getpid()), *map(str, pids)],
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        except Exception:  # noqa: BLE001 - best effort on the way out; the exit below happens regardless
            pass
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _shutdown_ray() -> None:

    try:
        import ray

        if ray.is_initialized():
            t = threading.Thread(target=ray.shutdown, daemon=True)
            t.start()
            t.join(15)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


# Waits (at most 30 s) until its parent has exited, then SIGKILLs the PIDs it was given.
_REAPER = """
import os, signal, sys, time
parent, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
deadline = time.time() + 30
while os.getppid() == parent and time.time() < deadline:
    time.sleep(0.01)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (children, their children, ...), read from /proc; [] where
    there is no /proc."""

    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def resume_hint(run_dir: str, cause: BaseException) -> str:
    """ "; continue it with: fedmllm run resume=DIR" where resuming can help: the run checkpointed
    a round it can continue from, and it did not fail in a way a resume repeats."""
    from fedmllm.server.run import NoRoundAggregated

    if isinstance(cause, NoRoundAggregated):
        return ""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            latest_state(Path(run_dir))
    except (FileNotFoundError, OSError):
        return ""
    return f"; continue it with: fedmllm run resume={run_dir}"


def _override(args, key: str) -> str | None:
    """The value of the command-line override `key=value` (unquoted), or None when it is absent."""
    return next((a.split("=", 1)[1].strip("'\"") for a in args if a.startswith(f"{key}=")), None)


def resume_overrides(run_dir: str, current: tuple[str, ...]) -> tuple[str, ...]:
    """A resumed run composes the stopped run's overrides (its `.hydra/overrides.yaml`), then the
    ones given now (e.g. a larger num_rounds); it writes into the stopped run's dir."""

    saved_file = Path(run_dir) / ".hydra" / "overrides.yaml"
    saved: list[str] = []
    if saved_file.is_file():
        saved = list(yaml.safe_load(saved_file.read_text()) or [])
    else:
        print(f"note: {saved_file} not found; resuming with the overrides given now only", flush=True)
    keep = [o for o in saved if not o.startswith(("out_dir=", "resume="))]
    return tuple(keep) + tuple(o for o in current if not o.startswith("out_dir="))


def preflight(cfg: dict) -> None:
    """Check offline assets before starting workers, so a missing one fails in one short line."""

    if cfg["model"].get("builder") == "smollm2":
        smollm2_gguf_path()
    if cfg["dataset"]["name"].startswith("easyvqa"):
        easyvqa._easy_vqa()
    else:
        check_source(cfg["dataset"])  # on-disk datasets: root and split files exist


def _partition(argv: list[str]) -> None:

    outs = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    overrides = [a for a in argv if not a.startswith("out=")]
    if len(outs) != 1 or not outs[0]:
        _fail("fedmllm partition needs one out=DIR (e.g. fedmllm partition scenario=missing out=data)")
    overrides = _without_run_bounds(overrides)
    try:
        cfg = compose(overrides)
        try:  # the stats' image tokens need the model's config and processor settings, not its weights
            counter = image_token_counter(cfg["model"])
        except (MissingAssetError, FileNotFoundError, OSError) as err:
            print(f"image tokens per sample left out of the stats: {err}", file=sys.stderr)
            counter = None
        target, stats = write_partitions(cfg, outs[0], image_tokens=counter)
    except (ConfigError, MissingAssetError, ValueError) as err:
        _fail(str(err))
    print(format_stats(stats))
    warn_empty([r["client"] for r in stats if r["num_samples"] == 0])
    print(f"chart: {target / 'stats.png'}")
    print(
        f'partition dir: {target}  (a SuperNode reads it with --node-config "partition-id=I num-partitions='
        f'{cfg["num_clients"]} data-dir={target}")',
        flush=True,
    )


def _inspect(argv: list[str]) -> None:

    bad = [a for a in argv if "=" not in a]
    if bad:
        _fail(f"fedmllm inspect takes Hydra overrides only (e.g. model=smol-llava peft=dora), got {bad}")
    argv = _without_run_bounds(argv)
    try:
        cfg = compose(argv)
        print(format_footprint(footprint(cfg)), flush=True)
        print(format_memory(predict_peak(cfg)), flush=True)
    except (ConfigError, MissingAssetError, FileNotFoundError, ValueError) as err:
        _fail(str(err))


def _without_run_bounds(overrides: list[str]) -> list[str]:
    """`overrides` for a command that samples no clients (partition, inspect): clients_per_round,
    a run setting, is then kept from exceeding a smaller num_clients."""
    if _override(overrides, "clients_per_round") is not None:
        return list(overrides)
    return [*overrides, "clients_per_round=${num_clients}"]


def _evaluate(argv: list[str]) -> None:

    dirs = [a for a in argv if "=" not in a]
    if len(dirs) != 1:
        _fail(
            f"fedmllm evaluate takes one run dir (and optionally round=N and key=value overrides), got {dirs or 'none'}"
        )
    overrides = [a for a in argv if "=" in a and not a.startswith("round=")]
    run_dir, rnd = _run_dir_and_round(dirs[0], _override(argv, "round"))
    try:
        result = evaluate_checkpoint(run_dir, rnd, overrides)
    except (ConfigError, MissingAssetError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    print(format_round(result))
    print(f"metrics: {run_dir / 'eval' / ('round-%d.json' % result['round'])}", flush=True)


def _run_dir_and_round(path: str, rnd: str | None) -> tuple[Path, int | None]:
    """(run dir, round or None) from the command line: a run dir with the optional round=N, or a
    checkpoint dir (<run dir>/checkpoints/round-<N>) read as that run and round (a round=N given
    as well must agree)."""
    if rnd is not None and not rnd.isdigit():
        _fail(f"round={rnd}: a round number (checkpoints/round-<N>)")
    p = Path(path).resolve()
    if p.parent.name == "checkpoints" and p.name.startswith("round-") and p.name[6:].isdigit():
        if rnd is not None and rnd != p.name[6:]:
            _fail(f"{path} is round {p.name[6:]}, but round={rnd} was given; pass one of them")
        return p.parent.parent, int(p.name[6:])
    return Path(path), None if rnd is None else int(rnd)


def _export(argv: list[str]) -> None:
    from peft import PeftConfig

    dirs = [a for a in argv if "=" not in a]
    known = ("round", "out", "merge", "dtype")
    unknown = [a for a in argv if "=" in a and a.split("=", 1)[0] not in known]
    if len(dirs) != 1 or unknown or _override(argv, "out") is None:
        _fail(
            "fedmllm export takes one run dir and out=DIR (optionally round=N, merge=true|false, dtype=...)"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    merge = (_override(argv, "merge") or "true").lower()
    if merge not in ("true", "false"):
        _fail(f"merge={merge}: true (the adapter merged into the weights) or false (kept beside them)")
    run_dir, rnd = _run_dir_and_round(dirs[0], _override(argv, "round"))
    try:
        ckpt = checkpoint_dir(run_dir, rnd)
        cfg = run_config(run_dir)
        family = family_of(cfg["model"], PeftConfig.from_pretrained(ckpt).base_model_name_or_path)
        out = export_checkpoint(
            ckpt, Path(_override(argv, "out")), family, merge == "true", _override(argv, "dtype") or "float32"
        )
    except (MissingAssetError, FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(str(err))
    print(f"exported {ckpt} -> {out}" + ("" if merge == "true" else f" (adapter in {out / 'adapter'})"), flush=True)


def _report(argv: list[str]) -> None:

    p = argparse.ArgumentParser(prog="fedmllm report")
    p.add_argument(
        "run_dir",
        type=Path,
        nargs="+",
        help="a run dir, or a sweep's multirun dir (its jobs in 0/, 1/, ...); several sweep dirs "
        "(e.g. one grid's seeds swept apart) make one report",
    )
    p.add_argument("--metric", default="accuracy", help="sweep: metric of the plot and the best-round column")
    p.add_argument("--out", type=Path, default=None, help="sweeps: where the report goes (default: the first dir)")
    args = p.parse_args(argv)
    dirs = args.run_dir
    if len(dirs) == 1 and (dirs[0] / "metrics.jsonl").is_file():
        for row in read_metrics(dirs[0]):
            print(format_round(row))
        print(f"plot: {plot_run(dirs[0])}")
        return
    bad = [str(d) for d in dirs if not is_multirun(d)]
    if bad:
        _fail(
            f"{', '.join(bad)}: no metrics.jsonl and no job subdirs (0/, 1/, ...); pass the 'run dir:' a run "
            "printed, or sweep dirs of `fedmllm run -m` (multirun/<date>/<time>)"
        )
    try:
        markdown, paths = write_report(dirs if len(dirs) > 1 else dirs[0], args.metric, args.out)
    except ValueError as err:
        _fail(str(err))
    print(markdown)
    print(f"table: {paths['md']}\ncsv: {paths['csv']}\nplot: {paths['png']}")


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
    elif cmd == "partition":
        _partition(rest)
    elif cmd == "inspect":
        _inspect(rest)
    elif cmd == "report":
        _report(rest)
    elif cmd == "evaluate":
        _evaluate(rest)
    elif cmd == "export":
        _export(rest)
    else:
        _fail(f"unknown command {cmd!r}\n{USAGE}")


if __name__ == "__main__":
    main()
