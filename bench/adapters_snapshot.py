"""Final adapters of every aggregator, to check that a refactor changed no result.

    python bench/adapters_snapshot.py save DIR [AGGREGATOR ...]   # 3 tiny rounds each, seed 42
    python bench/adapters_snapshot.py compare DIR_A DIR_B         # largest |difference| per aggregator

`save` runs each aggregator (default: every yaml in fedmllm/conf/aggregator/) for 3 rounds on
tiny-llava with the server and clients in this process (tests/inprocess.py) and keeps
the round-3 state (the global adapter, the server state: fedmllm-state.npz with what it leaves to
the adapter file filled in) as DIR/<name>.npz.
Run it on the old code (e.g. a `git worktree` of main, with PYTHONPATH set to it) and on the new,
then `compare`. Runs are deterministic on one machine, so an unchanged behaviour compares as 0.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def save(out: Path, names: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_overrides
    from inprocess import run_in_process
    from test_aggregators import EXTRA

    out.mkdir(parents=True, exist_ok=True)
    names = names or sorted(p.stem for p in (ROOT / "fedmllm/conf/aggregator").glob("*.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            extra = EXTRA.get(name, [])
            run = Path(tmp) / name
            t0 = time.time()
            run_in_process(
                tiny_overrides(
                    "num_rounds=3",
                    "server_stage=none",
                    "dataset.eval_samples=8",
                    f"out_dir={run}",
                    f"aggregator={name}",
                    *extra,
                )
            )
            state = run / "checkpoints/round-3/fedmllm-state.npz"
            try:  # since issue 22 the state file leaves the tensors of the adapter file to it
                from fedmllm.server.checkpoint import read_state_flat

                np.savez(out / f"{name}.npz", **read_state_flat(state))
            except ImportError:  # an older tree: the state file holds everything
                shutil.copy(state, out / f"{name}.npz")
            print(f"saved {name} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)


def compare(a: Path, b: Path) -> float:
    worst = 0.0
    print(f"{'aggregator':<18} {'arrays':>6} {'max |a - b|':>12}")
    for f in sorted(a.glob("*.npz")):
        if not (b / f.name).is_file():
            print(f"{f.stem:<18} missing in {b}")
            worst = float("inf")
            continue
        with np.load(f) as za, np.load(b / f.name) as zb:
            if sorted(za.files) != sorted(zb.files):
                print(f"{f.stem:<18} other arrays: {sorted(set(za.files) ^ set(zb.files))[:3]}")
                worst = float("inf")
                continue
            d = max((float(np.abs(za[k].astype(np.float64) - zb[k]).max()) if za[k].size else 0.0) for k in za.files)
        print(f"{f.stem:<18} {len(za.files):>6} {d:>12.3g}")
        worst = max(worst, d)
    print(f"largest difference: {worst:.3g}")
    return worst


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "save":
        save(Path(sys.argv[2]), sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(0 if compare(Path(sys.argv[2]), Path(sys.argv[3])) == 0 else 1)
    else:
        sys.exit(__doc__)
