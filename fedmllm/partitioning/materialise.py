"""`fedmllm partition`: every client's samples as JSONL, their stats and a chart, written atomically;
and the client side that reads them back (node_config `data-dir`)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from fedmllm.common import write_atomically
from fedmllm.config import ConfigError
from fedmllm.data import load_task
from fedmllm.data.schema import Sample, Task, modality
from fedmllm.partitioning import client_partition, label_partition
from fedmllm.partitioning.scenarios import scenario_tag

PROVENANCE = "partition.json"  # the settings a partition was built from; clients check theirs against it
TASK_FILE = "task.json"  # the task (labels, prompt wording): a client with data-dir needs nothing else of the dataset
MODALITIES = ("both", "image", "text", "none")
COMMAND = "fedmllm partition <the run's overrides> out=DIR"


def partition_name(cfg: dict[str, Any]) -> str:
    """`partition-alpha0.5-clt10` (FedMLLM's name, for partitioner=fedmllm); the flwr-datasets
    partitioners are named apart (`partition-dirichlet-alpha1.0-clt4`, `partition-iid-clt4`), and a
    seed other than 42 adds `-seed<s>`, since each draws a different partition."""
    p, n = cfg["partitioner"], cfg["num_clients"]
    name = {
        "fedmllm": f"partition-alpha{float(p.get('alpha', 0))}-clt{n}",
        "dirichlet": f"partition-dirichlet-alpha{float(p.get('alpha', 0))}-clt{n}",
    }.get(p["name"], f"partition-{p['name']}-clt{n}")
    return name if cfg["seed"] == 42 else f"{name}-seed{cfg['seed']}"


def partition_path(cfg: dict[str, Any], out: str | Path) -> Path:
    """`out/<dataset>/<scenario tag>/<partition name>`, the directory a node's `data-dir` names."""
    return Path(out) / cfg["dataset"]["name"] / scenario_tag(cfg["scenario"]) / partition_name(cfg)


def provenance(cfg: dict[str, Any], num_partitions: int) -> dict[str, Any]:
    """Everything the client pool and its partition depend on (not the held-out set's size)."""
    return {
        "dataset": {k: v for k, v in cfg["dataset"].items() if k != "eval_samples"},
        "partitioner": cfg["partitioner"],
        "scenario": cfg["scenario"],
        "num_clients": num_partitions,
        "seed": cfg["seed"],
    }


def build_partitions(cfg: dict[str, Any], pool: list[Sample]) -> list[list[Sample]]:
    """Every client's samples, as each client builds its own on the fly."""
    n = cfg["num_clients"]
    return [client_partition(pool, cfg, i, n) for i in range(n)]


def partition_stats(
    parts: list[list[Sample]], label_names: tuple[str, ...], image_tokens: Callable[[Sample], int] | None = None
) -> list[dict[str, Any]]:
    """Per client: `client`, `num_samples`, `labels` {name: count}, `modalities` {both, image,
    text, none: count}; with `image_tokens` (sample -> the tokens its image costs the configured
    model) also `image_tokens` {min, median, max, mean, total} over the client's samples."""
    stats = []
    for i, part in enumerate(parts):
        labels = dict.fromkeys(label_names, 0)
        mods = dict.fromkeys(MODALITIES, 0)
        for s in part:
            labels[label_names[s["label"]]] += 1
            mods[modality(s)] += 1
        row = {"client": i, "num_samples": len(part), "labels": labels, "modalities": mods}
        if image_tokens is not None:
            counts = sorted(image_tokens(s) for s in part) or [0]
            row["image_tokens"] = {
                "min": counts[0],
                "median": counts[len(counts) // 2],
                "max": counts[-1],
                "mean": round(sum(counts) / len(counts), 1),
                "total": sum(counts),
            }
        stats.append(row)
    return stats


def format_stats(stats: list[dict[str, Any]]) -> str:
    """The stats as a text table, one row per client and a total."""
    labels = list(stats[0]["labels"]) if stats else []
    cols = ["client", "samples", *MODALITIES, *labels]
    width = [max(7, len(c) + 1) for c in cols]
    rows = [[r["client"], r["num_samples"], *r["modalities"].values(), *r["labels"].values()] for r in stats]
    rows.append(["total", *(sum(r[j] for r in rows) for j in range(1, len(cols)))])
    fmt = lambda vals: "".join(f"{v!s:>{w}}" for v, w in zip(vals, width))  # noqa: E731
    head = fmt(cols)
    table = [head, "-" * len(head), *map(fmt, rows)]
    if stats and "image_tokens" in stats[0]:
        table.append("image tokens per sample (min / median / max), the model's processor logic:")
        table += [
            f"  client {r['client']}: {t['min']} / {t['median']} / {t['max']} (total {t['total']:,})"
            for r in stats
            for t in [r["image_tokens"]]
        ]
    return "\n".join(table)


def plot_stats(stats: list[dict[str, Any]], path: Path) -> Path:
    """Stacked bars per client: modalities (left) and labels (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["client"] for r in stats]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(clients) + 4), 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "modalities", "modalities"), (axes[1], "labels", "labels")):
        bottom = [0] * len(clients)
        for name in stats[0][key] if stats else {}:
            counts = [r[key][name] for r in stats]
            ax.bar(clients, counts, bottom=bottom, label=name)
            bottom = [b + c for b, c in zip(bottom, counts)]
        ax.set(title=f"samples per client by {title}", xlabel="client", ylabel="samples", xticks=clients)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_partitions(
    cfg: dict[str, Any],
    out: str | Path,
    task: Task | None = None,
    pool: list[Sample] | None = None,
    image_tokens: Callable[[Sample], int] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Write `client_<i>.jsonl`, `stats.json`, `stats.png` and `partition.json` under
    `partition_path(cfg, out)`; returns (that directory, stats). The files are written into a
    temporary sibling first and renamed into place, so a crash never leaves half a partition.
    `image_tokens`: see partition_stats."""
    if pool is None or task is None:
        task, pool, _ = load_task(cfg["dataset"], cfg["seed"])
    parts = build_partitions(cfg, pool)
    stats = partition_stats(parts, task.labels, image_tokens)
    target = partition_path(cfg, out)
    root = _image_root(parts)

    def fill(tmp: Path) -> None:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for i, part in enumerate(parts):
            with open(tmp / f"client_{i}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(_relative(s, root), ensure_ascii=False) + "\n" for s in part)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        (tmp / TASK_FILE).write_text(json.dumps(dataclasses.asdict(task), indent=1))
        (tmp / PROVENANCE).write_text(json.dumps({**provenance(cfg, cfg["num_clients"]), "image_root": root}, indent=1))
        plot_stats(stats, tmp / "stats.png")

    write_atomically(target, fill, replace=True)
    return target, stats


def _image_root(parts: list[list[Sample]]) -> str | None:
    """The deepest directory holding every image of the partition (its paths are stored relative
    to it, so the folder can be copied to the site that owns the data), or None without images."""
    paths = [s["image"] for part in parts for s in part if s["image"] is not None]
    return (
        os.path.dirname(os.path.commonpath(paths))
        if len(set(paths)) == 1
        else (os.path.commonpath(paths) if paths else None)
    )


def _relative(sample: Sample, root: str | None) -> Sample:
    if root is None or sample["image"] is None:
        return sample
    return {**sample, "image": os.path.relpath(sample["image"], root)}


def read_task(data_dir: str | Path) -> Task | None:
    """The task a partition directory was written for (None for one written before task.json)."""
    path = Path(data_dir) / TASK_FILE
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    return Task(**{**fields, "labels": tuple(fields["labels"])})


def read_client(
    data_dir: str | Path, cfg: dict[str, Any], partition_id: int, num_partitions: int, image_root: str | None = None
) -> list[Sample]:
    """This node's samples from a materialised partition directory (`client_<partition-id>.jsonl`),
    image paths resolved against `image_root` (node_config `image-root`; default: where the
    images were when the partition was written, from `partition.json`).

    Raises ConfigError naming the missing file, the settings that differ between the directory's
    `partition.json` and this run (with the command that writes the right one), or the images
    that are not under the image root (with the setting that points to them).
    """
    d = Path(data_dir)
    path = d / f"client_{partition_id}.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"node_config data-dir={str(d)!r} has no client_{partition_id}.jsonl; write it with `{COMMAND}` "
            f"and set data-dir to the partition directory it prints"
        )
    meta_path = d / PROVENANCE
    have: dict[str, Any] = {}
    if meta_path.is_file():
        have, want = json.loads(meta_path.read_text()), provenance(cfg, num_partitions)
        diff = sorted(k for k in want if have.get(k) != want[k])
        if diff:
            raise ConfigError(
                f"node_config data-dir={str(d)!r} was partitioned with "
                f"{ {k: have.get(k) for k in diff} }, but this run has { {k: want[k] for k in diff} }; "
                f"rewrite it with `{COMMAND}` or run with the directory's settings"
            )
    with open(path, encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()]
    root = image_root or have.get("image_root")
    if root is None:  # written before relative paths (absolute ones) or without images
        return samples
    for s in samples:
        if s["image"] is not None and not os.path.isabs(s["image"]):
            s["image"] = os.path.join(root, s["image"])
    missing = [s["image"] for s in samples if s["image"] is not None and not os.path.isfile(s["image"])]
    if missing:
        where = (
            f"node_config image-root={image_root!r}" if image_root else f"{root} (where `fedmllm partition` found them)"
        )
        raise ConfigError(
            f"{len(missing)} of the images of client_{partition_id}.jsonl are not under {where}, e.g. "
            f"{missing[0]}; copy them there, or set node_config image-root to the directory that holds "
            "the partition's images (their paths in the .jsonl are relative to it)"
        )
    return samples


def empty_clients(cfg: dict[str, Any], pool: list[Sample]) -> list[int]:
    """Clients whose label partition is empty (scenarios only drop modalities, never samples)."""
    parts = label_partition(pool, cfg["partitioner"], cfg["num_clients"], cfg["seed"])
    return [i for i, p in enumerate(parts) if not p]


def warn_empty(empty: list[int]) -> None:
    """One warning line per empty partition, saying what happens to it and the fix."""
    for i in empty:
        print(
            f"warning: client {i}'s partition is empty: it replies num-examples 0 and is left out of "
            "aggregation; lower num_clients or raise partitioner.alpha to give every client data",
            file=sys.stderr,
            flush=True,
        )
