"""metrics.jsonl, wandb, plots and progress."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from fedmllm.config import need, typed

LOGGERS = ("none", "wandb")
WANDB_MODES = ("auto", "online", "offline")


@dataclass
class LoggerSettings:
    """`logger`: none, or wandb (fedmllm/conf/logger/wandb.yaml says what each key does)."""

    name: str = "none"
    project: str = "fedmllm"
    entity: Optional[str] = None
    mode: str = "auto"  # auto: online with a wandb key (WANDB_API_KEY or ~/.netrc), else offline
    run_name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    log_checkpoint: bool = True

    def __post_init__(self) -> None:
        need(self.name in LOGGERS, f"logger={self.name!r}: choose none or wandb")
        need(self.mode in WANDB_MODES, f"logger.mode={self.mode!r}: choose auto, online or offline")


class MetricsLog:
    """Appends one JSON object per round to `<run dir>/metrics.jsonl` (flushed: nothing lost on a crash)
    and forwards it to the configured logger."""

    def __init__(self, run_dir: Path, logger: LoggerSettings | dict[str, Any], config: dict[str, Any]):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        logger = typed(LoggerSettings, logger, "logger")
        self.wandb = _init_wandb(logger, config, run_dir) if logger.name == "wandb" else None
        self.log_checkpoint = bool(logger.log_checkpoint)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["round"])

    def close(self) -> None:
        if self.wandb is not None:
            self._log_checkpoint()
            self.wandb.finish()

    def _log_checkpoint(self) -> None:
        """The last round's checkpoint (adapter, its config, the server state) as a wandb model
        artifact, unless logger.log_checkpoint is false."""
        last = next((r["checkpoint"] for r in reversed(self.rows) if r.get("checkpoint")), None)
        if not self.log_checkpoint or last is None or not (self.path.parent / last).is_dir():
            return
        import wandb

        artifact = wandb.Artifact(
            f"adapter-{self.wandb.id}", type="model", metadata={"round": self.rows[-1].get("round")}
        )
        artifact.add_dir(str(self.path.parent / last))
        self.wandb.log_artifact(artifact, aliases=["latest", f"round-{self.rows[-1].get('round')}"])


def _init_wandb(logger: LoggerSettings, config: dict[str, Any], run_dir: Path):
    import wandb

    mode = logger.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
        mode = "online" if has_key else "offline"
    run_dir = Path(run_dir)
    sweep = run_dir.parent if (run_dir.parent / "multirun.yaml").is_file() else None  # a job of `fedmllm run -m`
    group = logger.group or (sweep.name if sweep is not None else None)
    name = logger.run_name or (f"{sweep.name}/{run_dir.name}" if sweep is not None else run_dir.name)
    return wandb.init(
        project=logger.project,
        entity=logger.entity,
        mode=mode,
        dir=str(run_dir),
        config=config,
        name=name,
        group=group,
        tags=list(logger.tags or []),
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path) -> Path:
    """PNG of held-out accuracy (with and without the image) and train loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(run_dir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("accuracy", "o-"), ("accuracy_no_image", "s--"), ("auroc", "^:")):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), style, label=key)
    majority = majority_accuracy(run_dir)
    if majority is not None:  # what always answering the most frequent label scores
        ax1.axhline(majority, color="grey", lw=1, ls="-.", label=f"majority class ({majority:.2f})")
    if any(r.get("auroc") is not None for r in rows):
        ax1.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance AUROC (0.50)")
    ax1.set(xlabel="round", ylabel="held-out", title="centralized evaluation (round 0: untrained)", ylim=(0, 1))
    ax1.legend(fontsize=8)
    pts = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if pts:
        ax2.plot(*zip(*pts), "o-")
    ax2.set(xlabel="round", ylabel="mean client train loss", title="training")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def majority_accuracy(run_dir: Path) -> float | None:
    """The held-out accuracy of always answering the most frequent label (from the latest
    predictions/round-N.npz), or None when the run saved no predictions."""

    files = sorted(Path(run_dir).glob("predictions/round-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        return None
    with np.load(files[-1]) as z:
        labels = z["labels"]
    if not len(labels):
        return None
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / len(labels))


def format_round(row: dict[str, Any]) -> str:
    """One human line per round."""

    def f(key, fmt):
        v = row.get(key)
        return "-" if v is None else format(v, fmt)

    untrained = " (untrained)" if row["round"] == 0 else ""  # the initial adapter, before round 1
    return (
        f"round {row['round']:>3}{untrained} | train loss {f('train_loss', '.4f')} | acc {f('accuracy', '.3f')} "
        f"(no image {f('accuracy_no_image', '.3f')}) | auroc {f('auroc', '.3f')} | "
        + (f"unparsed {row['unparsed']}/{row.get('eval_samples', '?')} | " if "unparsed" in row else "")
        + f"up {_mb(row.get('bytes_up'))}{_per_client(row)} down {_mb(row.get('bytes_down'))} | "
        + (f"align {row['align_seconds']:.0f}s (loss {row['align_loss']:.3f}) | " if "align_seconds" in row else "")
        + (
            f"clients' own acc {row['client_accuracy_mean']:.3f} ± {row['client_accuracy_std']:.3f} "
            f"(worst {row['client_accuracy_min']:.3f}, client {row['client_accuracy_worst']}) | "
            if "client_accuracy_mean" in row
            else ""
        )
        + (f"eps {row['epsilon']:.2f} | " if "epsilon" in row else "")
        + f"{row.get('seconds', 0):.0f}s"
    )


def _per_client(row: dict[str, Any]) -> str:
    per = list((row.get("bytes_up_per_client") or {}).values())
    if not per:
        return ""
    if len(set(per)) == 1:
        return f" ({len(per)} x {per[0]:,} B)"
    return f" ({len(per)} clients, {min(per):,}-{max(per):,} B)"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"
