"""Compressed traffic (fedmllm/transport.py): what it costs in time, and what it saves in bytes.

python bench/transport.py time [--clients 10] [--sizes r8-qv r64-all]
    encode/decode per round for LLaVA-1.5-7B-sized adapters (bench/aggregate.py's arrays), each
    codec beside the round's aggregation through the strategy, measured in this process
python bench/transport.py summary SWEEP_DIR [...] [--plot FILE.png]
    per job of `fedmllm run -m ... transport=...`: final accuracy, total bytes up + down over
    the run, and its ratio to the fp32 job of the same sweep; --plot draws accuracy vs bytes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
sys.path.insert(0, str(Path(__file__).parent))

SETTINGS = {  # name: (codec, topk)
    "fp16": ("fp16", None),
    "bf16": ("bf16", None),
    "int8": ("int8", None),
    "nf4": ("nf4", None),
    "topk 0.1 + int8": ("int8", 0.1),
}


def time_codecs(size: str, clients: int) -> None:
    from aggregate import adapter_shapes, bench_size

    from fedmllm.models.adapter import payload_bytes
    from fedmllm.transport import TransportSettings, compress_update, decode

    shapes = adapter_shapes(size)
    rng = np.random.default_rng(0)
    glob = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}
    local = {k: v + rng.standard_normal(v.shape, dtype=np.float32) * 1e-4 for k, v in glob.items()}
    dense = sum(v.nbytes for v in glob.values())
    agg = bench_size(size, clients, 2)["warm_s"]
    for codec, topk in SETTINGS.values():  # first calls load bitsandbytes' and torch's kernels: not timed
        compress_update(
            {"w": local[next(iter(local))]}, {"w": glob[next(iter(glob))]}, TransportSettings(codec, topk), None
        )
    print(f"\n{size}: {dense / 1e6:.1f} MB per client; aggregating {clients} replies through the strategy: {agg:.3f} s")
    print(
        f"{'codec':18} {'MB sent':>8} {'ratio':>6} {'encode s':>9} {'decode x{0} s':>12} {'vs aggregation':>15}".format(
            clients
        )
    )
    for name, (codec, topk) in SETTINGS.items():
        settings = TransportSettings(codec=codec, topk=topk)
        t0 = time.perf_counter()
        encoded, _ = compress_update(local, glob, settings, None)  # one client's encode (with the feedback decode)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(clients):  # the server decodes every reply
            decode(encoded, {k: v.shape for k, v in glob.items()}, settings.block)
        t_dec = time.perf_counter() - t0
        sent = payload_bytes(encoded)
        print(
            f"{name:18} {sent / 1e6:>8.2f} {sent / dense:>6.3f} {t_enc:>9.3f} {t_dec:>12.3f} {t_dec / agg:>14.2f}x",
            flush=True,
        )


def jobs(sweeps: list[Path]) -> list[dict]:
    """One row per finished job: its transport choice, final accuracy, bytes over the run."""
    rows = []
    for sweep in sweeps:
        for job in sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()):
            metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines() if line.strip()]
            overrides = (
                (job / ".hydra" / "overrides.yaml").read_text() if (job / ".hydra" / "overrides.yaml").is_file() else ""
            )
            choice = next(
                (line.split("transport=")[1].strip() for line in overrides.splitlines() if "transport=" in line), "fp32"
            )
            last = metrics[-1]
            rows.append(
                {
                    "sweep": sweep.name,
                    "transport": choice,
                    "rounds": last["round"],
                    "accuracy": last.get("accuracy"),
                    "accuracy_no_image": last.get("accuracy_no_image"),
                    "bytes": sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in metrics),
                    "bytes_up": sum(r.get("bytes_up", 0) for r in metrics),
                    "bytes_down": sum(r.get("bytes_down", 0) for r in metrics),
                }
            )
    return rows


def summary(sweeps: list[Path], plot: Path | None) -> None:
    rows = jobs(sweeps)
    for sweep in sorted({r["sweep"] for r in rows}):
        mine = [r for r in rows if r["sweep"] == sweep]
        base = next((r for r in mine if r["transport"] == "fp32"), None)
        print(f"\n{sweep}")
        print(
            f"{'transport':16} {'accuracy':>8} {'Δ vs fp32':>9} {'no image':>8} {'MB up':>8} {'MB down':>8} {'total':>7}"
        )
        for r in mine:
            delta = f"{r['accuracy'] - base['accuracy']:+.3f}" if base else "-"
            ratio = f"{r['bytes'] / base['bytes']:.3f}x" if base else "-"
            print(
                f"{r['transport']:16} {r['accuracy']:>8.3f} {delta:>9} {r['accuracy_no_image'] or 0:>8.3f} "
                f"{r['bytes_up'] / 1e6:>8.1f} {r['bytes_down'] / 1e6:>8.1f} {ratio:>7}"
            )
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for sweep in sorted({r["sweep"] for r in rows}):
            mine = [r for r in rows if r["sweep"] == sweep]
            xs, ys = [r["bytes"] / 1e6 for r in mine], [r["accuracy"] for r in mine]
            ax.scatter(xs, ys, label=sweep)
            for r, x, y in zip(mine, xs, ys):
                ax.annotate(r["transport"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("MB up + down over the run (log)")
        ax.set_ylabel("held-out accuracy, last round")
        ax.set_title("Compressed traffic: accuracy vs bytes")
        ax.legend(fontsize=7)
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"\nplot: {plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("--clients", type=int, default=10)
    t.add_argument("--sizes", nargs="+", default=["r8-qv", "r64-all"])
    s = sub.add_parser("summary")
    s.add_argument("sweeps", nargs="+", type=Path)
    s.add_argument("--plot", type=Path)
    args = ap.parse_args()
    if args.cmd == "time":
        for size in args.sizes:
            time_codecs(size, args.clients)
    else:
        summary(args.sweeps, args.plot)


if __name__ == "__main__":
    main()
