"""Time of `fedmllm partition` on a 10,000-row Hateful-Memes-format fixture (issue goal: < 30 s).

    python bench/partition.py [--rows 10000]

Writes the fixture (generated images, the real jsonl layout) into a temp dir, then runs the
command as a user would, once per scenario, in a fresh process each (imports included).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    args = ap.parse_args()
    from fedmllm.data.fixtures import write_hateful_memes

    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = write_hateful_memes(Path(tmp) / "hm", n_rows=args.rows, seed=0)
        print(f"fixture: {args.rows} rows written in {time.perf_counter() - t0:.1f} s")
        print(f"{'scenario':40} {'seconds':>8}")
        for scenario in (
            ["scenario=aligned"],
            ["scenario=missing", "scenario.mrate=0.3"],
            ["scenario=cross", "scenario.image_clients=3"],
            ["scenario=hybrid", "scenario.qrate=0.4"],
        ):
            cmd = [
                sys.executable,
                "-m",
                "fedmllm.cli",
                "partition",
                "dataset=hateful_memes",
                f"dataset.root={root}",
                "partitioner=fedmllm",
                "num_clients=10",
                *scenario,
                f"out={tmp}/parts",
            ]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            print(f"{' '.join(scenario):40} {time.perf_counter() - t0:>8.1f}")


if __name__ == "__main__":
    main()
