"""Cost of a round in deployment: a fresh ClientApp process per message (Flower 1.42's design).

    python bench/deploy.py [hydra overrides]
    (no overrides: smol-llava at the demo's local steps, train.local_steps=6 x train.batch_size=8)

A fresh process does what `flwr-clientapp` does for a train message: start Python, import Flower
and the ClientApp, then call the app (compose the config, load the 4-bit model, read the partition,
load the global adapter, train `local_steps` steps, build the reply). Phases are timed inside the
process; the fixed cost is everything but the training steps. Side by side:
- fresh, quantize at load: the partition built on the fly from the dataset (flwr-datasets +
  Dirichlet: imports datasets/pyarrow and partitions the whole pool), the full-precision weights
  quantized to NF4 while loading (`model.quantized_cache=false`);
- fresh + data-dir: the partition read from `fedmllm partition` output (node_config data-dir);
- fresh + data-dir + pre-quantized cache: the packed NF4 model from $FEDMLLM_CACHE/quantized
  (the default since fedmllm.models.quantize);
- warm: a second message in the first process, model cached (simulation's case, the floor);
- worker (the default in deployment, fedmllm.client.worker): fresh ClientApp processes that import
  flwr + the ClientApp only and hand the message to the node's long-lived worker; the first message
  starts the worker (its imports and model load are in that message's call), later ones find it warm.
The model load alone, per mode and side by side, is bench/load.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = ["model=smol-llava", "train.local_steps=6", "train.batch_size=8", "num_clients=4"]
PHASES = ["start", "imports_flwr_app", "imports_ml", "model", "call_other", "train"]
LABELS = {
    "start": "interpreter start",
    "imports_flwr_app": "import flwr + ClientApp",
    "imports_ml": "import torch/transformers/peft/bnb",
    "model": "model load (4-bit + LoRA)",
    "call_other": "config + data + adapter + reply",
    "train": "training steps",
}


def train_message(app, arrays, rnd: int, node_config: dict, overrides: list[str]) -> tuple[float, float]:
    """Call the ClientApp with train message `rnd` as flwr-clientapp would: (call seconds, training seconds)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}),
        dst_node_id=1,
        message_type="train",
    )
    ctx = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={"overrides": " ".join(overrides)}
    )
    t0 = time.time()
    reply = app(msg, ctx)
    return time.time() - t0, float(reply.content["metrics"]["train-seconds"])


def child(spawned: float, overrides: list[str], data_dir: str, messages: int) -> dict:
    """One ClientApp process taking `messages` train messages (node_config data-dir=`data_dir` when
    given): phase seconds of each; only the first pays start, imports and model load."""
    t = {"main": time.time()}
    import flwr.app  # noqa: F401  flwr-clientapp's own imports before it loads the app
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    from fedmllm.client.app import app

    t["flwr"] = time.time()
    import bitsandbytes  # noqa: F401  imported anyway by the model load below; timed apart
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    t["ml"] = time.time()
    from flwr.supercore.task_identity import TaskIdentity

    from fedmllm.algorithms import server_peft
    from fedmllm.config import compose
    from fedmllm.models import get_model
    from fedmllm.models.adapter import adapter_state
    from fedmllm.records import to_record
    from fedmllm.stages.cache import model_config

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as flwr-clientapp sets them
    cfg = compose(overrides)
    lm = get_model(model_config(cfg), server_peft(cfg))  # the app's own get_model hits this process's cache
    t["model"] = time.time()
    arrays = to_record(adapter_state(lm.model))
    out = []
    node_config = {
        "partition-id": 0,
        "num-partitions": cfg["num_clients"],
        **({"data-dir": data_dir} if data_dir else {}),
    }
    for rnd in range(1, messages + 1):
        call, train = train_message(app, arrays, rnd, node_config, overrides)
        phases = (
            dict(
                start=t["main"] - spawned,
                imports_flwr_app=t["flwr"] - t["main"],
                imports_ml=t["ml"] - t["flwr"],
                model=t["model"] - t["ml"],
            )
            if rnd == 1
            else dict.fromkeys(PHASES[:4], 0.0)
        )
        out.append({**phases, "call_other": call - train, "train": train})
    return {"rounds": out}


def worker_child(spawned: float, overrides: list[str], data_dir: str, rnd: int, adapter: str) -> dict:
    """One fresh ClientApp process with node_config worker=true: imports flwr + the ClientApp (not
    torch), hands message `rnd` to the worker of this bench's process (starting it if none runs)."""
    t = {"main": time.time()}
    import flwr.app  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    from fedmllm.client.app import app

    t["flwr"] = time.time()
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    from fedmllm.records import to_record

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    with np.load(adapter) as z:
        arrays = to_record({k: z[k] for k in z.files})
    num_clients = next(o for o in overrides[::-1] if o.startswith("num_clients=")).split("=")[1]
    node_config = {"partition-id": 0, "num-partitions": int(num_clients), "data-dir": data_dir, "worker": "true"}
    call, train = train_message(app, arrays, rnd, node_config, overrides)
    assert "torch" not in sys.modules, "the ClientApp process imported torch"
    return {
        "rounds": [
            dict(
                start=t["main"] - spawned,
                imports_flwr_app=t["flwr"] - t["main"],
                imports_ml=0.0,
                model=0.0,
                call_other=call - train,
                train=train,
            )
        ]
    }


def fill_quantized_cache(overrides: list[str], adapter: Path) -> None:
    """Load the 4-bit model once, untimed, so the pre-quantized cache exists before it is timed
    (the load writes it); save the initial adapter for the worker variant's ClientApp processes
    (which import no torch)."""
    import numpy as np

    from fedmllm.algorithms import server_peft
    from fedmllm.config import compose
    from fedmllm.models import get_model
    from fedmllm.models.adapter import adapter_state
    from fedmllm.stages.cache import model_config

    cfg = compose(overrides)
    np.savez(adapter, **adapter_state(get_model(model_config(cfg), server_peft(cfg)).model))


def spawn(args: list[str], kind: str = "--child") -> dict:
    # output to a file, not a pipe: a worker the child starts inherits it and outlives the child
    with tempfile.NamedTemporaryFile(suffix=".json") as f, tempfile.TemporaryFile("w+") as log:
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        cmd = [sys.executable, __file__, kind, f.name, repr(time.time()), *args]
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        if proc.returncode != 0:
            log.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{log.read()[-3000:]}")
        return json.loads(Path(f.name).read_text())


def row(name: str, p: dict) -> str:
    total = sum(p[k] for k in PHASES)
    fixed = total - p["train"]
    cells = " | ".join(f"{p[k]:6.2f}" for k in PHASES)
    return f"| {name} | {cells} | {total:6.2f} | {fixed:6.2f} | {fixed / total:5.1%} |"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        out_file, spawned, data_dir, messages, *overrides = argv[1:]
        Path(out_file).write_text(json.dumps(child(float(spawned), overrides, data_dir, int(messages))))
        return
    if argv[:1] == ["--worker-child"]:
        out_file, spawned, data_dir, rnd, adapter, *overrides = argv[1:]
        Path(out_file).write_text(json.dumps(worker_child(float(spawned), overrides, data_dir, int(rnd), adapter)))
        return
    overrides = [*DEMO, *argv]
    print(f"overrides: {' '.join(overrides)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        part = subprocess.run(
            [sys.executable, "-m", "fedmllm.cli", "partition", *overrides, f"out={tmp}"], capture_output=True, text=True
        )
        if part.returncode != 0:
            sys.exit(f"fedmllm partition failed:\n{part.stderr[-2000:]}")
        data_dir = part.stdout.split("partition dir: ")[1].split()[0]
        adapter = Path(tmp) / "adapter.npz"
        fill_quantized_cache(overrides, adapter)
        no_cache = [*overrides, "model.quantized_cache=false"]
        fresh, warm = spawn(["", "2", *no_cache])["rounds"]
        fresh_dir = spawn([data_dir, "1", *no_cache])["rounds"][0]
        fresh_cached = spawn([data_dir, "1", *overrides])["rounds"][0]
        os.environ["FEDMLLM_WORKER_DIR"] = str(Path(tmp) / "workers")
        try:
            worker_first, worker_later = (
                spawn([data_dir, str(r), str(adapter), *overrides], "--worker-child")["rounds"][0] for r in (1, 2)
            )
        finally:
            from fedmllm.client import worker

            worker.stop(os.getpid())
    head = " | ".join(LABELS[k] for k in PHASES)
    print(
        f"\nseconds per client per round (one ClientApp process per message)\n\n| variant | {head} | round | fixed | fixed share |"
    )
    print("|---" * (len(PHASES) + 4) + "|")
    print(row("fresh process, quantize at load, partition built", fresh))
    print(row("fresh process + data-dir (partition read from disk)", fresh_dir))
    print(row("fresh process + data-dir + pre-quantized cache (default)", fresh_cached))
    print(row("warm: 2nd message, same process (simulation's floor)", warm))
    print(row("worker, 1st message: fresh ClientApp starts the node's worker", worker_first))
    print(row("**worker, later messages: fresh ClientApp, warm worker (default)**", worker_later))
    steps = int(next(o for o in overrides[::-1] if o.startswith("train.local_steps=")).split("=")[1])
    step = fresh["train"] / steps
    for name, p in (
        ("quantize at load", fresh),
        ("data-dir", fresh_dir),
        ("data-dir + pre-quantized cache", fresh_cached),
        ("worker (later messages)", worker_later),
    ):
        fixed = sum(p[k] for k in PHASES) - p["train"]
        print(
            f"{name}: fixed {fixed:.1f} s = {fixed / step:.1f} steps of {step:.2f} s; {fixed / (fixed + steps * step):.1%} "
            f"of a {steps}-step round; <= 15% needs >= {fixed * 85 / 15 / step:.0f} local steps"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
