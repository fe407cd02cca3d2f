"""Federated simulation wall time vs centralized training of the same steps and samples.

    python bench/overhead.py [hydra overrides]
    (no overrides: smol-llava, 2 rounds x 2 clients x 6 steps, 50 held-out samples)

Both sides run in fresh processes, one after the other, in this invocation:
- federated: `fedmllm run <overrides>` (Ray workers, messages, aggregation, checkpoints);
- centralized: one process loads the model once and, per round, trains every sampled client's
  `local_steps` steps on that client's own partition (the same batches), then runs the same
  held-out evaluation.
Ratio = federated / centralized wall time, process start to exit.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

DEFAULT = ["num_rounds=2", "num_clients=2", "clients_per_round=2", "train.local_steps=6", "dataset.eval_samples=50"]


def centralized(overrides: list[str]) -> None:
    """Train sequentially in one process: same partitions, batches and evaluations."""
    from fedmllm.client.rounds import local_data
    from fedmllm.config import NodeIdentity, compose
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.models import get_model
    from fedmllm.server.evaluate import evaluate
    from fedmllm.stages.cache import model_config
    from fedmllm.stages.vision import ensure_pretrained
    from fedmllm.training import round_seed, train_steps

    cfg = compose(overrides)
    ensure_pretrained(cfg)  # the same stage-1 base as the federated run (cached)
    lm = get_model(model_config(cfg), cfg["peft"])
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"], cfg.get("prompt"))
    col = Collator(lm.processor, lm.family, task)
    evaluate(lm.model, col, heldout, None, cfg["train"]["eval_batch_size"])
    for rnd in range(1, cfg["num_rounds"] + 1):
        for pid in range(cfg["clients_per_round"]):
            ident = NodeIdentity(pid, cfg["num_clients"])
            _, samples = local_data(cfg, ident)
            train_steps(lm.model, col, samples, cfg["train"], round_seed(cfg["seed"], rnd, pid))
        m = evaluate(lm.model, col, heldout, None, cfg["train"]["eval_batch_size"])
        print(f"centralized round {rnd}: accuracy {m['accuracy']:.3f}", flush=True)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    if sys.argv[1:2] == ["--centralized"]:
        centralized(sys.argv[2:])
        return
    overrides = sys.argv[1:] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        fed = timed([sys.executable, "-m", "fedmllm.cli", "run", *overrides, f"hydra.run.dir={tmp}/fed"])
    cen = timed([sys.executable, __file__, "--centralized", *overrides])
    print(f"overrides: {' '.join(overrides)}")
    print(f"federated simulation: {fed:7.1f} s")
    print(f"centralized:          {cen:7.1f} s")
    print(f"ratio federated/centralized: {fed / cen:.2f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
