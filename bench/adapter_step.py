"""Issue 3: what one step of the server's adapter pre-training costs on the CPU, four ways side by
side: plain (bitsandbytes unpacks every 4-bit weight in each forward and backward), the 4-bit
weights dequantized once (`fedmllm.models.quantize.dequantized`), the batch's shared prompt prefix
run once (`answer_loss(share_prefix=True)`), and both (what the stage does on the CPU); plus the
held-out check (100 questions scored), plain and with both.

    python bench/adapter_step.py [--batches 6] [hydra overrides]

One process, the variants interleaved batch by batch so a busy machine slows them alike; forward +
backward of the demo's batches of 16 public questions with captions as text, median seconds after
one warm-up batch. Also checks that each variant's loss and gradients match the plain step's.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np


def main() -> None:
    import torch

    from fedmllm.algorithms import server_peft
    from fedmllm.config import compose
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.models import get_model
    from fedmllm.models.quantize import dequantized
    from fedmllm.stages.adapter import _text_accuracy
    from fedmllm.stages.cache import model_config
    from fedmllm.stages.captions import load_public_captioned
    from fedmllm.stages.vision import ensure_pretrained
    from fedmllm.training import answer_loss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6, help="timed batches per variant (after one warm-up)")
    args, overrides = parser.parse_known_args()
    cfg = compose(overrides)
    ensure_pretrained(cfg)
    torch.manual_seed(0)
    lm = get_model(model_config(cfg), server_peft(cfg))
    task, _, _ = load_task(cfg["dataset"], cfg["seed"], cfg.get("prompt"))
    collator = Collator(lm.processor, lm.family, task)
    samples = load_public_captioned(cfg["dataset"], cfg["seed"])
    bs = int(cfg["server_stage"]["pretrain"]["lora"]["batch_size"])
    with torch.no_grad():  # a trained-looking adapter: B non-zero, so every LoRA tensor has a gradient
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    variants = {
        "plain": (False, False),
        "dequantized once": (False, True),
        "shared prefix": (True, False),
        "both (the stage on the CPU)": (True, True),
    }

    def step(batch, share, deq):
        with dequantized(lm.model) if deq else contextlib.nullcontext():
            t = time.perf_counter()
            loss = answer_loss(lm.model, dict(batch), share_prefix=share)
            loss.backward()
            seconds = time.perf_counter() - t
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        lm.model.zero_grad(set_to_none=True)
        return loss.item(), grads, seconds

    lm.model.train()
    times: dict[str, list[float]] = {k: [] for k in variants}
    worst: dict[str, float] = {k: 0.0 for k in variants}
    for i in range(args.batches + 1):
        batch = collator.train_batch(samples[bs * i : bs * (i + 1)])
        if not i:
            width = tuple(batch["input_ids"].shape)
        ref_loss = ref_grads = None
        for name, (share, deq) in variants.items():
            loss, grads, seconds = step(batch, share, deq)
            if ref_grads is None:
                ref_loss, ref_grads = loss, grads
            rel = max(float((a - b).norm() / (a.norm() + 1e-12)) for a, b in zip(ref_grads, grads))
            worst[name] = max(worst[name], rel, abs(loss - ref_loss) / abs(ref_loss))
            if i:
                times[name].append(seconds)
    print(
        f"adapter-stage step, batch {width[0]} x {width[1]} tokens, {torch.get_num_threads()} threads, "
        f"median of {args.batches}:"
    )
    print(f"{'variant':32s} {'s/step':>7s} {'vs plain':>9s} {'max rel. diff (loss, grads)':>28s}")
    plain = float(np.median(times["plain"]))
    for name in variants:
        med = float(np.median(times[name]))
        print(f"{name:32s} {med:7.2f} {med / plain:9.2f} {worst[name]:28.1e}")

    val = samples[-100:]
    lm.model.eval()
    check = {}
    for rep in range(2):
        for name, fast in (("plain", False), ("both", True)):
            with dequantized(lm.model) if fast else contextlib.nullcontext():
                t = time.perf_counter()
                acc = _text_accuracy(lm.model, collator, val, share_prefix=fast)
                if rep:
                    check[name] = (time.perf_counter() - t, acc)
    print(
        f"held-out check (100 questions): plain {check['plain'][0]:.2f} s, both {check['both'][0]:.2f} s "
        f"({check['both'][0] / check['plain'][0]:.2f}); accuracy {check['plain'][1]:.2f} vs {check['both'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
