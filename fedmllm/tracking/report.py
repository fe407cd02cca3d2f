"""Sweep report: a Hydra multirun dir (one job dir per setting) -> results table (markdown, CSV) and plot."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmllm.evaluation.metrics import MODALITY_ORDER

# Final-round columns, in this order, when at least one job logged them.
BASE_METRICS = ("accuracy", "macro_f1", "auroc", "accuracy_no_image", "client_accuracy_mean", "client_accuracy_min")
IGNORED_KEYS = ("out_dir",)  # differs per job by construction
# Settings whose jobs are replicates of one another in the grouped tables: the seed, and the
# client a local-only baseline trains (FedMLLM reports the spread over clients).
REPLICATE_KEYS = ("seed", "aggregator.client.only")


@dataclass(frozen=True)
class Job:
    """One job of a sweep as found on disk."""

    name: str  # the job's subdir: 0, 1, ...
    overrides: dict[str, str] | None  # Hydra's .hydra/overrides.yaml as key -> value; None when absent
    config: dict[str, Any]  # config.yaml flattened to dotted keys; {} when absent
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    status: str = "ok"  # ok | incomplete | failed
    note: str = ""  # why a job is incomplete or failed


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """Hydra override strings -> key: value ("+a.b=1" -> {"a.b": "1"}; "~a" -> {"a": "<deleted>"})."""
    out: dict[str, str] = {}
    for o in overrides:
        if o.startswith("~"):
            out[o.lstrip("~").split("=", 1)[0]] = "<deleted>"
            continue
        key, sep, value = o.partition("=")
        if not sep:
            raise ValueError(f"override {o!r} has no '='; Hydra overrides look like key=value")
        out[key.lstrip("+")] = value
    return out


def job_status(rows: list[dict[str, Any]], num_rounds: int | None, truncated: bool = False) -> tuple[str, str]:
    """(status, note) of a job from its metrics rows and its configured number of rounds."""
    if not rows:
        return "failed", "no rounds logged"
    last = rows[-1].get("round")
    if num_rounds is not None and (last is None or last < num_rounds):
        return "incomplete", f"round {last} of {num_rounds}"
    trained = [r for r in rows if (r.get("round") or 0) >= 1]
    if trained and not any(_aggregated(r) for r in trained):  # the run raised NoRoundAggregated
        return "failed", "no round aggregated"
    if truncated:
        return "incomplete", "metrics.jsonl ends in a partial line"
    return "ok", ""


def _aggregated(row: dict[str, Any]) -> bool:
    """Whether a round's row holds an aggregated update: one client reply kept (rows without a
    client list, as baselines may write, count as aggregated)."""
    clients = row.get("clients")
    return clients is None or any(not c.get("dropped") for c in clients)


def settings(jobs: list[Job]) -> tuple[list[str], list[dict[str, Any]]]:
    """The settings that differ between jobs, and each job's values of them ("-" where it has none).

    Source: Hydra's per-job overrides when every job has them (a failed job has them too: Hydra
    writes them before the job starts); else the jobs' config.yaml, with a config group's keys
    folded into one `<group>` column (its `<group>.name`) when that name differs.
    """
    use_overrides = bool(jobs) and all(j.overrides is not None for j in jobs)
    values = [(j.overrides or {}) if use_overrides else j.config for j in jobs]
    compared = values if use_overrides else [v for v in values if v]  # no config.yaml: nothing to compare
    keys: list[str] = []
    for v in compared:
        keys += [k for k in v if k not in keys and k not in IGNORED_KEYS]
    differing = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True, default=str) for v in compared}) > 1]
    if not use_overrides:
        groups = sorted({k[: -len(".name")] for k in differing if k.endswith(".name")})
        differing = groups + [k for k in differing if k.split(".", 1)[0] not in groups]
        values = [{**v, **{g: v[f"{g}.name"] for g in groups if f"{g}.name" in v}} for v in values]
    return differing, [{k: v.get(k, "-") for k in differing} for v in values]


def swept_keys(jobs: list[Job]) -> list[str]:
    """The settings that differ between jobs (see `settings`)."""
    return settings(jobs)[0]


def job_label(values: dict[str, Any], name: str) -> str:
    """`key=value, ...` of a job's swept settings, or `job <name>` when nothing differs."""
    return ", ".join(f"{k}={v}" for k, v in values.items()) or f"job {name}"


def final_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last evaluated round (the last round is always evaluated; an incomplete job's last one)."""
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    return evaluated[-1] if evaluated else {}


def metric_columns(jobs: list[Job], metric: str) -> list[str]:
    """Final-round metric columns present in any job: base metrics, per-modality accuracies,
    `unparsed` (generate mode) and the selected metric."""
    seen = {k for j in jobs for r in j.rows for k, v in r.items() if isinstance(v, (int, float))}
    cols = [m for m in BASE_METRICS if m in seen]
    cols += [f"accuracy_{g}" for g in MODALITY_ORDER if f"accuracy_{g}" in seen]
    cols += [m for m in ("unparsed",) if m in seen]
    if metric not in cols:
        cols.append(metric)
    return cols


def results_table(jobs: list[Job], metric: str = "accuracy") -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one row per job): job, swept settings, status, rounds, final-round metrics,
    total bytes uploaded, and the best value of `metric` over the trained rounds (>= 1) with its round."""
    logged = {k for j in jobs for r in j.rows for k in r}
    if logged and metric not in logged:
        numeric = sorted(
            {
                k
                for j in jobs
                for r in j.rows
                for k, v in r.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        raise ValueError(f"metric {metric!r} is not in any job's metrics.jsonl; choose one of {numeric}")
    keys, values = settings(jobs)
    metrics = metric_columns(jobs, metric)
    columns = ["job", *keys, "status", "rounds", *metrics, "bytes_up_total", f"best_{metric}", "best_round"]
    table = []
    for j, setting in zip(jobs, values):
        final = final_row(j.rows)
        # round 0 is the untrained initial adapter: never the best round of a run
        scored = [r for r in j.rows if isinstance(r.get(metric), (int, float)) and r.get("round", 0) > 0]
        best = max(scored, key=lambda r: r[metric]) if scored else {}
        row: dict[str, Any] = {"job": j.name, **setting}
        row["status"] = j.status if not j.note else f"{j.status} ({j.note})"
        row["rounds"] = j.rows[-1].get("round") if j.rows else None
        row.update({m: final.get(m) for m in metrics})
        row["bytes_up_total"] = sum(r.get("bytes_up") or 0 for r in j.rows) if j.rows else None
        row[f"best_{metric}"] = best.get(metric)
        row["best_round"] = best.get("round")
        table.append(row)
    return columns, table


def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (ddof 1; None for one value), n) of the values given."""

    v = np.asarray([x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)], dtype=float)
    if not len(v):
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), len(v)


def _pm(values: list[float]) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f} ({n})" if std is not None else f"{mean:.3f} (1)"


def seed_table(jobs: list[Job], metric: str = "accuracy") -> tuple[list[str], list[dict[str, Any]]] | None:
    """Jobs that differ only in `seed` (or a local baseline's client) grouped into one row each:
    the other swept settings, `n` and every final metric as "mean ± std (n)" over the group's
    finished jobs. None when no replicate key is swept."""
    keys, values = settings(jobs)
    reps = [k for k in keys if k in REPLICATE_KEYS]
    if not reps:
        return None
    rest = [k for k in keys if k not in reps]
    metrics = metric_columns(jobs, metric)
    groups: dict[str, list[Job]] = {}
    labels: dict[str, dict[str, Any]] = {}
    for j, v in zip(jobs, values):
        key = json.dumps({k: v[k] for k in rest}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(j)
        labels[key] = {k: v[k] for k in rest}
    table = []
    for key, members in groups.items():
        done = [j for j in members if j.status == "ok"]
        row = {**labels[key], "n": f"{len(done)} of {len(members)}"}
        row.update({m: _pm([final_row(j.rows).get(m) for j in done]) for m in metrics})
        table.append(row)
    return [*rest, "n", *metrics], table


def scenario_label(config: dict[str, Any]) -> str:
    """A job's modality scenario as FedMLLM's tables name it: aligned, missing (m=0.3), cross
    (k=2 image clients), hybrid (q=0.4)."""
    name = config.get("scenario.name", "aligned")
    detail = {
        "missing": ("m", "scenario.mrate"),
        "cross": ("k", "scenario.image_clients"),
        "hybrid": ("q", "scenario.qrate"),
    }.get(name)
    return f"{name} ({detail[0]}={config.get(detail[1])})" if detail else str(name)


def method_label(config: dict[str, Any]) -> str:
    """A job's method column: the aggregator (fedavg, local, centralized, ...) with FedMLLM's
    modality-agnostic prompt (+aug) and adaptive regularization (+adareg) when on, and "(no
    pre-trained adapter)" when the server's stages ran without the one that trains the initial
    adapter (`server_stage.pretrain.lora.enabled=false`: the adapter starts from PEFT's init, as
    FedSA-LoRA's always does), so such a control never pools with the default runs."""
    label = str(config.get("aggregator.name", "fedavg"))
    if config.get("prompt.name") == "aug":
        label += "+aug"
    if config.get("train.adaptive_reg.enabled") or config.get("aggregator.client.adaptive_reg"):
        label += "+adareg"
    if config.get("server_stage.pretrain.enabled") and config.get("server_stage.pretrain.lora.enabled") is False:
        label += " (no pre-trained adapter)"
    return label


def grid_table(jobs: list[Job], metric: str = "accuracy") -> tuple[list[str], list[dict[str, Any]]] | None:
    """FedMLLM's table shape: scenarios as rows, methods as columns, each cell the final `metric`
    as "mean ± std (n)" over the finished jobs of that scenario and method (seeds, and a local
    baseline's clients). None unless the jobs span more than one scenario or method."""
    cells: dict[tuple[str, str], list[Any]] = {}
    for j in jobs:
        if j.status == "ok":
            cells.setdefault((scenario_label(j.config), method_label(j.config)), []).append(
                final_row(j.rows).get(metric)
            )
    scenarios = list(dict.fromkeys(s for s, _ in cells))
    methods = list(dict.fromkeys(m for _, m in cells))
    if len(scenarios) < 2 and len(methods) < 2:
        return None
    table = [{"scenario": s, **{m: _pm(cells[(s, m)]) if (s, m) in cells else "-" for m in methods}} for s in scenarios]
    return ["scenario", *methods], table


def personal_table(jobs: list[Job]) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Global vs personalized accuracy per scenario and method: the server's held-out accuracy of
    the global adapter beside the clients' accuracy of their own model on their own held-out split
    (eval.client_fraction; FedSA-LoRA's personal A + own B), mean over clients and the worst client,
    each "mean ± std (n)" over the finished jobs. None unless some job evaluated on its clients."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for j in jobs:
        final = final_row(j.rows)
        if j.status == "ok" and final.get("client_accuracy_mean") is not None:
            cells.setdefault((scenario_label(j.config), method_label(j.config)), []).append(final)
    if not cells:
        return None
    columns = ["scenario", "method", "global", "personalized (client mean)", "worst client"]
    table = [
        {
            "scenario": s,
            "method": m,
            "global": _pm([r.get("accuracy") for r in rows]),
            "personalized (client mean)": _pm([r["client_accuracy_mean"] for r in rows]),
            "worst client": _pm([r.get("client_accuracy_min") for r in rows]),
        }
        for (s, m), rows in cells.items()
    ]
    return columns, table


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def to_markdown(columns: list[str], table: list[dict[str, Any]]) -> str:
    """A GitHub markdown table (floats to 3 decimals, missing values as -)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: list[str], table: list[dict[str, Any]]) -> Path:
    """The table as CSV (raw values, missing as empty)."""
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in table:
            w.writerow({c: "" if r.get(c) is None else r[c] for c in columns})
    return Path(path)


def plot_sweep(jobs: list[Job], metric: str, path: Path) -> Path:
    """PNG: left, `metric` per round, one line per job; right, its final value per job as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [job_label(v, j.name) for j, v in zip(jobs, settings(jobs)[1])]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    finals = []
    colors = [f"C{i % 10}" for i in range(len(jobs))]  # a job's line and bar share a colour
    for j, label, color in zip(jobs, labels, colors):
        pts = [(r["round"], r[metric]) for r in j.rows if isinstance(r.get(metric), (int, float))]
        if pts:
            ax1.plot(*zip(*pts), "o-" if j.status == "ok" else "x--", color=color, label=label)
        finals.append(final_row(j.rows).get(metric))
    ax1.set(xlabel="round", ylabel=metric, title=f"{metric} per round")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax1.lines:
        ax1.legend(fontsize=8)
    x = range(len(jobs))
    ax2.bar(x, [f if f is not None else 0 for f in finals], color=colors)
    for i, (j, f) in enumerate(zip(jobs, finals)):
        text = j.status if f is None else f"{f:.3f}" + ("" if j.status == "ok" else f"\n{j.status}")
        ax2.text(i, f if f is not None else 0, text, ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax2.set(ylabel=f"final {metric}", title=f"final {metric} per setting")
    values = [f for f in finals if f is not None]
    if values and all(0 <= v <= 1 for v in values):
        ax1.set_ylim(0, 1)
        ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def read_rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a metrics.jsonl and whether it ended in an unreadable (partially written) line."""
    rows, truncated = [], False
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            truncated = True
    return rows, truncated


def load_job(job_dir: Path) -> Job:
    """A job dir's overrides, config and metrics, with its status (a missing file makes it failed)."""

    job_dir = Path(job_dir)
    ov_path = job_dir / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(yaml.safe_load(ov_path.read_text()) or []) if ov_path.is_file() else None
    cfg_path = job_dir / "config.yaml"
    config = flatten(yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    metrics_path = job_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        note = "no metrics.jsonl" if cfg_path.is_file() else "no config.yaml or metrics.jsonl"
        return Job(job_dir.name, overrides, config, [], "failed", note)
    rows, truncated = read_rows(metrics_path)
    num_rounds = config.get("num_rounds")
    status, note = job_status(rows, num_rounds if isinstance(num_rounds, int) else None, truncated)
    return Job(job_dir.name, overrides, config, rows, status, note)


def job_dirs(multirun_dir: Path) -> list[Path]:
    """A multirun dir's job subdirs (numeric names, Hydra's `${hydra.job.num}`), in job order."""
    return sorted(
        (p for p in Path(multirun_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )


def is_multirun(path: Path) -> bool:
    """Whether `path` looks like a Hydra multirun dir (multirun.yaml or numbered job subdirs)."""
    path = Path(path)
    return path.is_dir() and ((path / "multirun.yaml").is_file() or bool(job_dirs(path)))


def write_report(
    multirun_dir: Path | list[Path], metric: str = "accuracy", out: Path | None = None
) -> tuple[str, dict[str, Path]]:
    """Write report.md, report.csv and report.png into `out` (default: the first sweep dir);
    return (markdown, paths). Several sweep dirs (e.g. the same grid's seeds swept on different
    days) make one report, their jobs named <sweep dir name>/<job>."""
    sweeps = [Path(d) for d in (multirun_dir if isinstance(multirun_dir, (list, tuple)) else [multirun_dir])]
    jobs = []
    for sweep in sweeps:
        dirs = job_dirs(sweep) if sweep.is_dir() else []
        if not dirs:
            raise ValueError(f"{sweep} has no job subdirs (0/, 1/, ...); pass the dir `fedmllm run -m` swept into")
        loaded = [load_job(d) for d in dirs]
        jobs += loaded if len(sweeps) == 1 else [replace(j, name=f"{sweep.name}/{j.name}") for j in loaded]
    multirun_dir = Path(out) if out is not None else sweeps[0]
    multirun_dir.mkdir(parents=True, exist_ok=True)
    title = ", ".join(str(d) for d in sweeps)
    columns, table = results_table(jobs, metric)
    markdown = to_markdown(columns, table)
    paths = {
        "md": multirun_dir / "report.md",
        "csv": write_csv(multirun_dir / "report.csv", columns, table),
        "png": plot_sweep(jobs, metric, multirun_dir / "report.png"),
    }
    text = (
        f"# Sweep report: {title}\n\nFinal round; best `{metric}` over the trained rounds (round 0 is the untrained initial adapter).\n\n"
        + markdown
    )
    grouped = seed_table(jobs, metric)
    if grouped is not None:
        part = to_markdown(*grouped)
        markdown += "\nOver seeds (mean ± sample std (n finished)):\n\n" + part
        text += "\n## Over seeds\n\nFinal round, mean ± sample standard deviation (n finished jobs).\n\n" + part
    grid = grid_table(jobs, metric)
    if grid is not None:
        part = to_markdown(*grid)
        markdown += f"\nScenarios x methods, final `{metric}`:\n\n" + part
        text += (
            f"\n## Scenarios x methods\n\nFinal `{metric}`, mean ± sample standard deviation (n finished "
            "jobs: seeds, and a local baseline's clients), as FedMLLM's tables.\n\n" + part
        )
        paths["grid_csv"] = write_csv(multirun_dir / "report_grid.csv", *grid)
    personal = personal_table(jobs)
    if personal is not None:
        part = to_markdown(*personal)
        markdown += "\nGlobal vs personalized accuracy (final round):\n\n" + part
        text += (
            "\n## Global vs personalized\n\nFinal round: the server's held-out accuracy of the global adapter, "
            "and each client's accuracy of its own model on its own held-out split (eval.client_fraction), "
            "mean over clients and the worst client; mean ± sample standard deviation (n finished jobs).\n\n" + part
        )
        paths["personal_csv"] = write_csv(multirun_dir / "report_personal.csv", *personal)
    paths["md"].write_text(text)
    return markdown, paths
