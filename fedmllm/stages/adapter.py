"""Adapter pre-training, `server_stage.pretrain.lora`: after stage 1, the server trains the run's
adapter on the public pool's task samples with each image replaced by its caption as text ("The
image shows a red circle. <question>"). The language model learns the task from words; stage 1
made the image tokens stand in for those words, so the adapter then answers from images. It
becomes the initial global adapter (cached per stage-1 result, PEFT, aggregator and task)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedmllm.algorithms import algorithm_of
from fedmllm.common import write_atomically
from fedmllm.config import typed
from fedmllm.evaluation.scoring import score_options
from fedmllm.models.adapter import adapter_params, adapter_state, load_adapter_state
from fedmllm.models.device import model_device
from fedmllm.models.quantize import dequantized
from fedmllm.stages import AdapterStageSettings
from fedmllm.stages.cache import ADAPTER, SUMMARY, _result, adapter_dir
from fedmllm.stages.captions import load_public_captioned
from fedmllm.training import PLAIN_LOOP, StepBar, TrainSettings, train_steps

# The adapter stage's check gate reads the answer accuracy of the last 5 training batches (80
# questions at batch 16): on the plateau their mean stayed within 0.42-0.61, and after the crossing it was 0.91.
GATE_BATCHES = 5


def ensure_adapter_pretrained(cfg: dict[str, Any], lm, collator, log=print) -> dict[str, Any] | None:
    """Load the pre-trained initial adapter into `lm.model` (the server's model, built with
    `algorithm.server_peft(cfg)`), training and caching it first unless cached; returns its summary (`seconds`
    0 and `cached` true when it was there), or None when `server_stage.pretrain.lora` is off or
    the aggregator cannot use it."""
    algorithm = algorithm_of(cfg)
    out = adapter_dir(cfg)
    if out is None:
        return None
    if not algorithm.adapter_stage:
        log(
            f"stage 1 adapter: skipped, aggregator={algorithm.name} does not start its clients from the "
            "server's adapter (FedSA-LoRA keeps each client's B local from zero), so it would not reach them"
        )
        return None
    if (out / ADAPTER).is_file():
        load_adapter_state(lm.model, load_file(str(out / ADAPTER)))
        return _result(json.loads((out / SUMMARY).read_text()), out, cached=True)
    lora = typed(AdapterStageSettings, cfg["server_stage"]["pretrain"]["lora"], "server_stage.pretrain.lora")
    samples = load_public_captioned(cfg["dataset"], cfg["seed"])
    if len(samples) < 20:
        raise ValueError(
            f"server_stage.pretrain.lora needs captioned public samples; dataset.public_fraction="
            f"{cfg['dataset']['public_fraction']} gives {len(samples)}: raise it (e.g. 0.5)"
        )
    rng = random.Random(cfg["seed"])
    order = list(range(len(samples)))
    rng.shuffle(order)
    n_val = min(int(lora.eval_samples), len(samples) // 5)
    val = [samples[i] for i in order[:n_val]]
    train = [samples[i] for i in order[n_val:]]
    steps = int(lora.steps)
    # On the CPU: every 4-bit weight dequantized once for the whole stage, and each batch's shared
    # prompt prefix run once (the same losses in about 0.8 of the time, docs/benchmarks.md)
    on_cpu = model_device(lm.model).type == "cpu"

    def score() -> float:
        acc = _text_accuracy(lm.model, collator, val, on_cpu)
        lm.model.train()  # scoring left the model in eval mode; training goes on
        return acc

    gate = CheckGate(int(lora.eval_every or 0), lora.stop_accuracy, lora.check_gate, steps, score)
    log(
        f"stage 1 adapter: training the initial adapter on {len(train)} public questions with the "
        f"captions as text (at most {steps} steps of {lora.batch_size}{gate.describe(n_val)}; once, then cached in {out})"
    )
    t0 = time.time()
    loop = replace(
        typed(TrainSettings, cfg["train"], "train"),
        **PLAIN_LOOP,
        batch_size=lora.batch_size,
        lr=lora.lr,
        local_steps=steps,
        share_prefix=on_cpu,
    )
    # FFA-LoRA: the clients' A is derived from the seed and frozen, so the stage trains B only
    frozen = [
        p for k, p in adapter_params(lm.model).items() if algorithm.frozen_in_adapter_stage(k) and p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    bar = StepBar("stage 1 adapter", steps, every=10, extra=lambda: {"answered": f"{np.mean(gate.answered[-10:]):.2f}"})
    losses = bar.losses

    def on_step(step: int, loss: float) -> None:
        bar(step, loss)
        if gate.after_step(step):
            bar.show(answered=f"{np.mean(gate.recent()):.2f}", text_acc=f"{gate.curve[-1][1]:.2f}")

    try:
        with dequantized(lm.model):
            text_acc = _text_accuracy(lm.model, collator, val, on_cpu)
            train_steps(
                lm.model,
                collator,
                train,
                loop,
                cfg["seed"],
                on_step=on_step,
                stop=gate.reached,
                on_answers=gate.on_answers,
            )
            final = gate.checked_now()
            if final is None:
                final = _text_accuracy(lm.model, collator, val, on_cpu)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    k = max(1, min(10, len(losses) // 10))
    summary = {
        "steps": len(losses),
        "max_steps": steps,
        "stop_accuracy": gate.target,
        "batch_size": int(loop.batch_size),
        "public_samples": len(train),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "losses": [round(x, 4) for x in losses],
        "val_text_accuracy_before": text_acc,
        "val_text_accuracy": final,
        "val_text_accuracy_curve": gate.curve,
        "check_gate": gate.gate,
        "batch_answer_accuracy": [round(a, 4) for a in gate.answered],
        "seconds": round(time.time() - t0, 1),
    }
    arrays = adapter_state(lm.model)

    def fill(tmp: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ADAPTER))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))

    write_atomically(out, fill)
    log(f"stage 1 adapter: done in {summary['seconds']:.0f} s; {format_adapter_summary(summary)}")
    return _result(summary, out, cached=False)


class CheckGate:
    """When the adapter stage scores its held-out questions, and when it stops.

    Every `every` steps (0: never during training), except after the last step; with `gate` set,
    only once the last GATE_BATCHES batches answered at least `gate` of their questions right
    (below it, the check, about 5 s, could not reach `target`). Training stops once a check reaches
    `target` (None: run every step). `score()` returns the held-out accuracy."""

    def __init__(self, every: int, target: float | None, gate: float | None, steps: int, score):
        self.every, self.target, self.gate, self.steps, self.score = every, target, gate, steps, score
        self.answered: list[float] = []  # each batch's answer accuracy, before the step trained on it
        self.curve: list[list[float]] = []  # [step, held-out accuracy] of every check
        self.done = 0  # steps done

    def describe(self, n_val: int) -> str:
        if not (self.every and self.target is not None):
            return ""
        until = f", stopping once {self.target:.2f} of {n_val} held-out ones are right"
        if self.gate is not None:
            until += f", checked every {self.every} steps once the batches answer {self.gate:.2f} right"
        return until

    def on_answers(self, step: int, accuracy: float) -> None:
        self.answered.append(accuracy)

    def recent(self) -> list[float]:
        return self.answered[-GATE_BATCHES:]

    def after_step(self, step: int) -> bool:
        """Score the held-out questions if this step is due and the gate is open; whether it did."""
        self.done = step + 1
        if not (self.every and self.done % self.every == 0 and self.done < self.steps):
            return False
        recent = self.recent()
        if self.gate is not None and not (recent and float(np.mean(recent)) >= float(self.gate)):
            return False
        self.curve.append([self.done, self.score()])
        return True

    def checked_now(self) -> float | None:
        """The held-out accuracy scored after the latest step, or None when it was not scored."""
        return self.curve[-1][1] if self.curve and self.curve[-1][0] == self.done else None

    def reached(self) -> bool:
        acc = self.checked_now()
        return self.target is not None and acc is not None and acc >= float(self.target)


def format_adapter_summary(summary: dict[str, Any]) -> str:
    stopped = (
        f"stopped at step {summary['steps']} of {summary['max_steps']}; "
        if summary.get("max_steps", summary["steps"]) > summary["steps"]
        else f"{summary['steps']} steps; "
    )
    return (
        stopped + f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}; held-out public questions "
        f"with captions as text: accuracy {summary['val_text_accuracy_before']:.2f} -> "
        f"{summary['val_text_accuracy']:.2f}"
    )


def _text_accuracy(model, collator, samples, share_prefix: bool = False) -> float:
    labels = np.array([s["label"] for s in samples])
    scores = score_options(model, collator, samples, batch_size=50, share_prefix=share_prefix)
    return float((scores.argmax(1) == labels).mean())
