"""Aggregation cost through the strategy vs a plain numpy weighted sum, and payload per aggregator.

    python bench/aggregate.py [--clients 10] [--repeats 3] [--sizes r8-qv r64-all]

Adapters of LLaVA-1.5-7B's language model (Vicuna-7B: 32 layers, hidden 4096, MLP 11008):
`r8-qv` is LoRA r=8 on q,v (4.2M parameters, 16.8 MB per client); `r64-all` is r=64 on every
linear layer (160M parameters, 640 MB per client). Both timings aggregate the same 10 replies
in this process: "strategy" is aggregator=fedavg's AdapterStrategy.aggregate_train on Flower Messages (decoding every
ArrayRecord, checking each reply, averaging, metrics), "numpy" the weighted sum of the already
decoded arrays (sum_k w_k x_k in float32). To fit memory, the 10 replies share 3 distinct
payloads (the work is the same as for 10 distinct ones).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

LAYERS, HIDDEN, MLP = 32, 4096, 11008
SHAPES = {  # module -> (in, out)
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, MLP),
    "up_proj": (HIDDEN, MLP),
    "down_proj": (MLP, HIDDEN),
}
SIZES = {"r8-qv": (8, ["q_proj", "v_proj"]), "r64-all": (64, list(SHAPES))}


def adapter_shapes(size: str) -> dict[str, tuple[int, int]]:
    rank, modules = SIZES[size]
    out = {}
    for layer in range(LAYERS):
        for m in modules:
            fan_in, fan_out = SHAPES[m]
            pre = f"base_model.model.model.language_model.layers.{layer}.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}"
            out[f"{pre}.lora_A.weight"] = (rank, fan_in)
            out[f"{pre}.lora_B.weight"] = (fan_out, rank)
    return out


def numpy_weighted_sum(payloads, weights):
    w = np.asarray(weights, np.float64) / sum(weights)
    out = {}
    for k in payloads[0]:
        acc = np.zeros_like(payloads[0][k])
        for wi, p in zip(w, payloads):
            acc += np.float32(wi) * p[k]
        out[k] = acc
    return out


def bench_size(size: str, clients: int, repeats: int) -> dict:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmllm.algorithms import algorithm_class
    from fedmllm.records import from_record, to_record
    from fedmllm.strategies.wrapper import AdapterStrategy

    FedAvg = algorithm_class("fedavg")().strategy_class()

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    shapes = adapter_shapes(size)
    rng = np.random.default_rng(0)
    distinct = [{k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()} for _ in range(3)]
    records = [to_record(p) for p in distinct]
    weights = [int(rng.integers(10, 100)) for _ in range(clients)]
    glob = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    nbytes = sum(v.nbytes for v in glob.values())

    class Nodes:
        def get_node_ids(self):
            return list(range(1, clients + 1))

    t_strategy, t_warm, t_numpy = [], [], []
    for _ in range(repeats):
        strategy = AdapterStrategy(FedAvg(min_train_nodes=clients, min_available_nodes=clients, fraction_train=1.0))
        for server_round, times in ((1, t_strategy), (2, t_warm)):  # round 2: the strategy's buffers exist
            sent = list(strategy.configure_train(server_round, to_record(glob), ConfigRecord(), Nodes()))
            replies = [
                Message(
                    RecordDict(
                        {
                            "arrays": records[i % 3],
                            "metrics": MetricRecord({"num-examples": weights[i], "partition-id": i}),
                        }
                    ),
                    reply_to=m,
                )
                for i, m in enumerate(sent)
            ]
            gc.collect()
            t0 = time.perf_counter()
            arrays, _ = strategy.aggregate_train(server_round, replies)
            times.append(time.perf_counter() - t0)
            got = from_record(arrays)
            del arrays, replies, sent
        payloads = [distinct[i % 3] for i in range(clients)]
        gc.collect()
        t0 = time.perf_counter()
        want = numpy_weighted_sum(payloads, weights)
        t_numpy.append(time.perf_counter() - t0)
        worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        assert worst < 1e-5, f"strategy and numpy disagree by {worst}"
        del got, want
    s, w, n = min(t_strategy), min(t_warm), min(t_numpy)
    return {
        "size": size,
        "params": sum(int(np.prod(v)) for v in shapes.values()),
        "mb": nbytes / 1e6,
        "strategy_s": s,
        "warm_s": w,
        "numpy_s": n,
        "ratio": s / n,
        "warm_ratio": w / n,
    }


def payload_table(size: str, flora_ranks=(4, 8, 16), flora_max_rank: int = 64) -> list[tuple[str, float, float]]:
    """(aggregator, MB up per client, MB down per client) for the LoRA tensors of `size`."""
    shapes = adapter_shapes(size)
    rank = SIZES[size][0]
    full = sum(a * b for a, b in shapes.values()) * 4 / 1e6
    a_only = sum(a * b for k, (a, b) in shapes.items() if ".lora_A." in k) * 4 / 1e6
    b_only = full - a_only
    per_rank = full / rank  # MB of one rank unit (A row + B column over all modules)
    rows = [
        ("fedavg / fedavgm / fedprox / fedadam / fedyogi / fedadagrad / fedmllm_default", full, full),
        ("scaffold (adapter + control variate)", 2 * full, 2 * full),
        ("ffa_lora (B only)", b_only, b_only),
        ("fedsa_lora (A only; B stays on the client)", a_only, a_only),
    ]
    for r in flora_ranks:
        rows.append((f"flora, client rank {r}, global rank {flora_max_rank}", per_rank * r, per_rank * flora_max_rank))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args()
    print(f"aggregating {args.clients} client adapters (best of {args.repeats})")
    print("strategy: its first round (fresh result buffers) and a later one (buffers reused), each vs numpy")
    print(
        f"{'adapter':10} {'params':>12} {'MB/client':>10} {'round 1 s':>10} {'later s':>8} {'numpy s':>8} "
        f"{'ratio 1':>8} {'later':>6}"
    )
    for size in args.sizes:
        r = bench_size(size, args.clients, args.repeats)
        print(
            f"{r['size']:10} {r['params']:>12,} {r['mb']:>10.1f} {r['strategy_s']:>10.3f} {r['warm_s']:>8.3f} "
            f"{r['numpy_s']:>8.3f} {r['ratio']:>7.2f}x {r['warm_ratio']:>5.2f}x",
            flush=True,
        )
        gc.collect()
    for size in args.sizes:
        print(f"\npayload per client per round, LoRA tensors of {size} (MB):")
        print(f"{'aggregator':78} {'up':>8} {'down':>8}")
        for name, up, down in payload_table(size):
            print(f"{name:78} {up:>8.1f} {down:>8.1f}")


if __name__ == "__main__":
    main()
