"""MLLM-FL's server-side stages on the server's public pool (disjoint from every client's data).

- Stage 1, `server_stage.pretrain`: before round 1, train the vision tower and projector so that
  image tokens mean something to the frozen language model (LLaVA's stage 1). Objectives:
  `embed` pulls each group of projected image tokens toward the language model's own input
  embedding of one caption word (no language-model forward pass); `caption` trains LLaVA-style
  captioning through the frozen language model. The result is cached per base model, stage
  settings and public pool (fedmllm.models.stage1) and loaded by server and clients alike.
- Adapter pre-training, `server_stage.pretrain.lora`: after stage 1, the server trains the run's
  adapter on the public pool's task samples with each image replaced by its caption as text ("The
  image shows a red circle. <question>"). The language model learns the task from words; stage 1
  made the image tokens stand in for those words, so the adapter then answers from images. It
  becomes the initial global adapter (cached per stage-1 result, PEFT, aggregator and task).
- Global alignment, `server_stage.align`: after aggregation, the server fine-tunes the global
  adapter on the public task samples for a few steps.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmllm.models.device import model_device, to_model
from fedmllm.models.quantize import dequantized
from fedmllm.models.stage1 import ADAPTER, SUMMARY, WEIGHTS, adapter_dir, stage1_dir
from fedmllm.training import PLAIN_LOOP

if TYPE_CHECKING:  # pragma: no cover
    import torch

# The adapter stage's check gate reads the answer accuracy of the last 5 training batches (80
# questions at batch 16): on the plateau their mean stayed within 0.42-0.61, and after the crossing it was 0.91.
GATE_BATCHES = 5


def ensure_pretrained(cfg: dict[str, Any], log=print) -> dict[str, Any] | None:
    """Build the stage-1 result the config asks for unless it is cached; return its summary
    (with `seconds` 0 and `cached` true when it was there already), or None when disabled."""
    out = stage1_dir(cfg)
    if out is None:
        return None
    if (out / WEIGHTS).is_file():
        return _result(json.loads((out / SUMMARY).read_text()), out, cached=True)
    from fedmllm.data import load_public_captions
    from fedmllm.models.load import load_model

    pairs = load_public_captions(cfg["dataset"], cfg["seed"])
    if len(pairs) < 10:
        raise ValueError(
            f"server_stage.pretrain needs public images; dataset.public_fraction="
            f"{cfg['dataset'].get('public_fraction')} gives {len(pairs)}: raise it (e.g. 0.5)"
        )
    stage = cfg["server_stage"]["pretrain"]
    log(f"stage 1: training vision tower + projector on {len(pairs)} public images "
        f"({stage['objective']}, {stage['steps']} steps; once, then cached in {out})")
    t0 = time.time()
    model, processor, family = load_model(cfg["model"])
    summary = pretrain(model, processor, family, pairs, stage, cfg["seed"])
    summary["seconds"] = round(time.time() - t0, 1)
    from safetensors.torch import save_file

    from fedmllm.common import write_atomically

    prefixes = tuple(p + "." for g in ("vision_encoder", "projector") for p in family.module_groups[g])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))

    write_atomically(out, fill)
    log(f"stage 1: done in {summary['seconds']:.0f} s; {format_summary(summary)}")
    return _result(summary, out, cached=False)


def _result(summary: dict[str, Any], out: Path, cached: bool) -> dict[str, Any]:
    """A server stage's summary as a run records it: `build_seconds` what building it took,
    `seconds` what this run spent on it (0 when it came from the cache)."""
    return {**summary, "cached": cached, "build_seconds": summary["seconds"],
            "seconds": 0.0 if cached else summary["seconds"], "dir": str(out)}


def format_summary(summary: dict[str, Any]) -> str:
    words = ", ".join(f"slot {i} {a:.2f}" for i, a in enumerate(summary.get("val_slot_accuracy", [])))
    return (f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}"
            + (f"; held-out nearest-word accuracy {words}" if words else ""))


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")


def image_inputs(processor, family, images) -> dict:
    """The family's own image tensors for a batch of PIL images (pixel_values, and what the
    family adds: Qwen's image_grid_thw, Idefics3's pixel_attention_mask, OneVision's image_sizes),
    through the same prompt + processor path as training."""
    prompt = family.prompt(processor, "", "Describe the image.", True)
    enc = family.encode(processor, [prompt] * len(images), list(images))
    return {k: v for k, v in enc.items() if k not in TEXT_KEYS}


def image_features(model, inputs: dict) -> "torch.Tensor":
    """Projected image tokens [B, T, D] (what replaces the image tokens in the LM input) of
    image_inputs(...)."""
    import torch

    inputs = to_model(inputs, model)
    feats = model.model.get_image_features(**inputs)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):  # one tensor per image (Qwen, OneVision); same size here
        feats = torch.stack([f.reshape(-1, f.shape[-1]) for f in feats])
    batch = len(inputs["image_grid_thw"]) if "image_grid_thw" in inputs else inputs["pixel_values"].shape[0]
    return feats.reshape(batch, -1, feats.shape[-1])


def _augment(x, rng: random.Random):
    """A random 90-degree rotation and horizontal flip of the whole batch (easy-vqa's shapes and
    colours do not change under them): 8 views of every public image. `x`: a [B, C, H, W] pixel
    batch, or a list of PIL images (families whose processors tile or flatten the pixels)."""
    import torch

    turns, flip = rng.randrange(4), rng.random() < 0.5
    if isinstance(x, torch.Tensor):
        x = torch.rot90(x, turns, (2, 3))
        return torch.flip(x, (3,)) if flip else x
    from PIL import Image

    ops = [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]
    x = [im.transpose(ops[turns - 1]) if turns else im for im in x]
    return [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in x] if flip else x


def _schedule(opt, steps: int, warmup: int):
    import torch

    def f(s: int) -> float:
        return min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def pretrain(model, processor, family, pairs, stage: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train the vision tower + projector of `model` in place; returns a summary with the loss
    curve and held-out (10% of the public images) nearest-word accuracy per caption slot."""
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    pairs = list(pairs)
    rng.shuffle(pairs)
    n_val = max(1, len(pairs) // 10)
    val, train = pairs[:n_val], pairs[n_val:]
    groups = ("vision_encoder", "projector")
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(family.group_of(name) in groups)
        if p.requires_grad:
            params.append(p)
    objective = stage["objective"]
    steps, bs = int(stage["steps"]), int(stage["batch_size"])
    opt = torch.optim.AdamW(params, lr=float(stage["lr"]), weight_decay=0.0)
    sched = _schedule(opt, steps, int(stage.get("warmup", max(1, steps // 20))))

    def images(items):
        out = []
        for path, _ in items:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        return out

    if objective == "embed":
        step_loss, evaluate = _embed_objective(model, processor, family, train, val, images, stage)
    elif objective == "caption":
        step_loss, evaluate = _caption_objective(model, processor, family, train, val)
    else:
        raise ValueError(f"server_stage.pretrain.objective={objective!r}: choose embed or caption")
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="stage 1", unit="step", file=sys.stderr, mininterval=2.0)
    for step in bar:
        idx = [rng.randrange(len(train)) for _ in range(bs)]
        loss = step_loss(idx, rng if stage.get("augment", True) else None)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"stage 1: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    for p in params:
        p.requires_grad_(False)
    k = max(1, min(20, steps // 10))
    return {
        "objective": objective,
        "steps": steps,
        "public_images": len(pairs),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "losses": [round(x, 4) for x in losses[:: max(1, steps // 100)]],
        **evaluate(),
    }


def _word_embedding(model, tokenizer, word: str):
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].detach().float().mean(0)


def _embed_objective(model, processor, family, train, val, images, stage):
    """Token group i of every image -> the LM's input embedding of caption word i: a scaled MSE
    plus a cosine cross-entropy against the other words seen in that slot.

    Where the processor gives a plain [B, C, H, W] pixel batch (LLaVA, PaliGemma), the public
    images are processed once and augmented as tensors; otherwise (Qwen's flattened patches,
    Idefics3's and OneVision's tiles) each step augments and processes its images."""
    import torch
    import torch.nn.functional as F

    n_slots = len(train[0][1])
    vocab = [sorted({words[i] for _, words in train + val}) for i in range(n_slots)]
    tok = processor.tokenizer
    table = [torch.stack([_word_embedding(model, tok, w) for w in v]) for v in vocab]
    scale = model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean()
    temp = float(stage.get("temperature", 20.0))
    train_img, val_img = images(train), images(val)
    val_in = image_inputs(processor, family, val_img)
    pixel_batches = set(val_in) == {"pixel_values"} and val_in["pixel_values"].dim() == 4
    train_pix = image_inputs(processor, family, train_img)["pixel_values"] if pixel_batches else None

    def batch_inputs(idx, rng):
        if pixel_batches:
            x = train_pix[idx]
            return {"pixel_values": _augment(x, rng) if rng is not None else x}
        batch = [train_img[i] for i in idx]
        return image_inputs(processor, family, _augment(batch, rng) if rng is not None else batch)
    device = table[0].device  # the model's: the features and the word table are there
    target = [torch.tensor([vocab[i].index(words[i]) for _, words in train], device=device) for i in range(n_slots)]
    val_target = [torch.tensor([vocab[i].index(words[i]) for _, words in val], device=device) for i in range(n_slots)]

    def slots(feats):
        return torch.tensor_split(feats, n_slots, dim=1)

    def step_loss(idx, rng):
        feats = image_features(model, batch_inputs(idx, rng)).float()
        loss = feats.new_zeros(())
        for i, group in enumerate(slots(feats)):
            y = target[i][idx]
            loss = loss + ((group - table[i][y].unsqueeze(1)) ** 2).sum(-1).mean() / scale**2
            logits = F.normalize(group, dim=-1) @ F.normalize(table[i], dim=-1).T * temp
            loss = loss + F.cross_entropy(logits.reshape(-1, len(vocab[i])), y.repeat_interleave(group.shape[1]))
        return loss

    def evaluate():
        with torch.no_grad():
            feats = image_features(model, val_in).float()
            acc = []
            for i, group in enumerate(slots(feats)):
                pred = (F.normalize(group, dim=-1) @ F.normalize(table[i], dim=-1).T).argmax(-1)
                acc.append(float((pred == val_target[i].unsqueeze(1)).float().mean()))
        return {"val_slot_accuracy": acc, "slots": vocab}

    return step_loss, evaluate


def _caption_objective(model, processor, family, train, val):
    """LLaVA stage 1: '<image> Describe the image.' -> 'a <word> <word>', loss on the caption."""
    import torch

    from fedmllm.data.collate import Collator
    from fedmllm.data.schema import Task
    from fedmllm.training import answer_loss

    captions = sorted({"a " + " ".join(words) for _, words in train + val})
    task = Task("caption", labels=tuple(captions), instruction="Describe the image.")
    collator = Collator(processor, family, task)

    def sample(item):
        path, words = item
        return {"id": path, "image": path, "text": None, "label": captions.index("a " + " ".join(words))}

    def step_loss(idx, rng):
        return answer_loss(model, collator.train_batch([sample(train[i]) for i in idx]))

    def evaluate():
        with torch.no_grad():
            losses = [answer_loss(model, collator.train_batch([sample(v) for v in val[i:i + 16]])).item()
                      for i in range(0, len(val), 16)]
        return {"val_caption_loss": float(np.mean(losses))}

    return step_loss, evaluate


def ensure_adapter_pretrained(cfg: dict[str, Any], lm, collator, log=print) -> dict[str, Any] | None:
    """Load the pre-trained initial adapter into `lm.model` (the server's model, built with
    `algorithm.server_peft(cfg)`), training and caching it first unless cached; returns its summary (`seconds`
    0 and `cached` true when it was there), or None when `server_stage.pretrain.lora` is off or
    the aggregator cannot use it."""
    from fedmllm.algorithms import algorithm_of

    algorithm = algorithm_of(cfg)
    out = adapter_dir(cfg)
    if out is None:
        return None
    if not algorithm.adapter_stage:
        log(f"stage 1 adapter: skipped, aggregator={algorithm.name} does not start its clients from the "
            "server's adapter (FedSA-LoRA keeps each client's B local from zero), so it would not reach them")
        return None
    from safetensors.numpy import load_file, save_file

    from fedmllm.models.adapter import adapter_state, load_adapter_state

    if (out / ADAPTER).is_file():
        load_adapter_state(lm.model, load_file(str(out / ADAPTER)))
        return _result(json.loads((out / SUMMARY).read_text()), out, cached=True)
    from fedmllm.data import load_public_captioned

    lora = cfg["server_stage"]["pretrain"]["lora"]
    samples = load_public_captioned(cfg["dataset"], cfg["seed"])
    if len(samples) < 20:
        raise ValueError(f"server_stage.pretrain.lora needs captioned public samples; dataset.public_fraction="
                         f"{cfg['dataset'].get('public_fraction')} gives {len(samples)}: raise it (e.g. 0.5)")
    rng = random.Random(cfg["seed"])
    order = list(range(len(samples)))
    rng.shuffle(order)
    n_val = min(int(lora.get("eval_samples", 100)), len(samples) // 5)
    val = [samples[i] for i in order[:n_val]]
    train = [samples[i] for i in order[n_val:]]
    steps = int(lora["steps"])
    every, target = int(lora.get("eval_every") or 0), lora.get("stop_accuracy")
    gate = lora.get("check_gate")
    until = f", stopping once {target:.2f} of {n_val} held-out ones are right" if every and target is not None else ""
    if until and gate is not None:
        until += f", checked every {every} steps once the batches answer {gate:.2f} right"
    log(f"stage 1 adapter: training the initial adapter on {len(train)} public questions with the "
        f"captions as text (at most {steps} steps of {lora['batch_size']}{until}; once, then cached in {out})")
    t0 = time.time()
    # On the CPU: every 4-bit weight dequantized once for the whole stage, and each batch's shared
    # prompt prefix run once (the same losses in about 0.8 of the time, docs/benchmarks.md)
    on_cpu = model_device(lm.model).type == "cpu"
    train_cfg = {**cfg["train"], **PLAIN_LOOP, "batch_size": lora["batch_size"], "lr": lora["lr"],
                 "local_steps": steps, "share_prefix": on_cpu}
    from fedmllm.models.adapter import adapter_params

    # FFA-LoRA: the clients' A is derived from the seed and frozen, so the stage trains B only
    frozen = [p for k, p in adapter_params(lm.model).items() if algorithm.frozen_in_adapter_stage(k) and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="stage 1 adapter", unit="step", file=sys.stderr, mininterval=2.0)
    losses: list[float] = []
    answered: list[float] = []  # each batch's answer accuracy, before the step trained on it
    curve: list[list[float]] = []  # [step, held-out text accuracy] every eval_every steps

    def checked_now() -> float | None:
        """The held-out accuracy scored after the latest step, or None when it was not scored."""
        return curve[-1][1] if curve and curve[-1][0] == len(losses) else None

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", answered=f"{np.mean(answered[-10:]):.2f}")
        if not (every and (step + 1) % every == 0 and step + 1 < steps):
            return
        # The last GATE_BATCHES batches are questions the adapter had not trained on when it answered
        # them: below the gate, the held-out check (about 5 s) could not reach stop_accuracy, so it is skipped
        recent = answered[-GATE_BATCHES:]
        if gate is None or (recent and float(np.mean(recent)) >= float(gate)):
            curve.append([step + 1, _text_accuracy(lm.model, collator, val, on_cpu)])
            lm.model.train()  # scoring left the model in eval mode; training goes on
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", answered=f"{np.mean(recent):.2f}",
                            text_acc=f"{curve[-1][1]:.2f}")

    def reached() -> bool:
        acc = checked_now()
        return target is not None and acc is not None and acc >= float(target)

    try:
        from fedmllm.training import train_steps

        with dequantized(lm.model):
            text_acc = _text_accuracy(lm.model, collator, val, on_cpu)
            train_steps(lm.model, collator, train, train_cfg, cfg["seed"], on_step=on_step, stop=reached,
                        on_answers=lambda _, acc: answered.append(acc))
            final = checked_now()
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
        "stop_accuracy": target,
        "batch_size": int(train_cfg["batch_size"]),
        "public_samples": len(train),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "losses": [round(x, 4) for x in losses],
        "val_text_accuracy_before": text_acc,
        "val_text_accuracy": final,
        "val_text_accuracy_curve": curve,
        "check_gate": gate,
        "batch_answer_accuracy": [round(a, 4) for a in answered],
        "seconds": round(time.time() - t0, 1),
    }
    arrays = adapter_state(lm.model)

    def fill(tmp: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ADAPTER))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))

    from fedmllm.common import write_atomically

    write_atomically(out, fill)
    log(f"stage 1 adapter: done in {summary['seconds']:.0f} s; {format_adapter_summary(summary)}")
    return _result(summary, out, cached=False)


def format_adapter_summary(summary: dict[str, Any]) -> str:
    stopped = (f"stopped at step {summary['steps']} of {summary['max_steps']}; "
               if summary.get("max_steps", summary["steps"]) > summary["steps"] else f"{summary['steps']} steps; ")
    return (stopped + f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}; held-out public questions "
            f"with captions as text: accuracy {summary['val_text_accuracy_before']:.2f} -> "
            f"{summary['val_text_accuracy']:.2f}")


def _text_accuracy(model, collator, samples, share_prefix: bool = False) -> float:
    from fedmllm.evaluation.scoring import score_options

    labels = np.array([s["label"] for s in samples])
    scores = score_options(model, collator, samples, batch_size=50, share_prefix=share_prefix)
    return float((scores.argmax(1) == labels).mean())


class Aligner:
    """Global alignment: after aggregation, fine-tune the global adapter on the public task
    samples for `align.local_steps` steps (same trainer as the clients); returns the new adapter."""

    def __init__(self, cfg: dict[str, Any], lm, collator, public_samples):
        self.cfg = cfg
        self.lm = lm
        self.collator = collator
        self.samples = public_samples
        align = cfg["server_stage"]["align"]
        self.train_cfg = {**cfg["train"], **PLAIN_LOOP,
                          **{k: v for k, v in align.items() if k in ("local_steps", "batch_size", "lr", "projector_lr")}}
        self.rounds = align.get("rounds", "all")
        if not public_samples:
            raise ValueError("server_stage.align needs public samples: set dataset.public_fraction > 0 (e.g. 0.5)")

    def __call__(self, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, dict]:
        """The aligned adapter and its cost, or (None, {}) in a round that `align.rounds` skips."""
        from fedmllm.models.adapter import adapter_state, load_adapter_state
        from fedmllm.training import round_seed, train_steps

        if self.rounds == "last" and server_round != self.cfg["num_rounds"]:
            return None, {}
        t0 = time.time()
        load_adapter_state(self.lm.model, arrays)
        # a partition id no client has: the server's batches differ from every client's
        seed = round_seed(self.cfg["seed"], server_round, 99_991)
        with dequantized(self.lm.model):  # on the CPU: 4-bit weights unpacked once per alignment
            result = train_steps(self.lm.model, self.collator, self.samples, self.train_cfg, seed)
        out = adapter_state(self.lm.model)
        return out, {"align_seconds": round(time.time() - t0, 2), "align_loss": result["train-loss"]}
