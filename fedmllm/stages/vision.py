"""Stage 1, `server_stage.pretrain`: before round 1, train the vision tower and projector so that
image tokens mean something to the frozen language model (LLaVA's stage 1). Objectives: `embed`
pulls each group of projected image tokens toward the language model's own input embedding of one
caption word (no language-model forward pass); `caption` trains LLaVA-style captioning through
the frozen language model. Cached per base model, stage settings and public pool (stages.cache)
and loaded by server and clients alike."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fedmllm.common import write_atomically
from fedmllm.data.collate import Collator
from fedmllm.data.schema import Task
from fedmllm.models.device import to_model
from fedmllm.models.load import load_model
from fedmllm.stages.cache import SUMMARY, WEIGHTS, _result, stage1_dir
from fedmllm.stages.captions import load_public_captions
from fedmllm.training import StepBar, answer_loss, optimize

if TYPE_CHECKING:  # pragma: no cover
    import torch


def ensure_pretrained(cfg: dict[str, Any], log=print) -> dict[str, Any] | None:
    """Build the stage-1 result the config asks for unless it is cached; return its summary
    (with `seconds` 0 and `cached` true when it was there already), or None when disabled."""
    out = stage1_dir(cfg)
    if out is None:
        return None
    if (out / WEIGHTS).is_file():
        return _result(json.loads((out / SUMMARY).read_text()), out, cached=True)

    pairs = load_public_captions(cfg["dataset"], cfg["seed"])
    if len(pairs) < 10:
        raise ValueError(
            f"server_stage.pretrain needs public images; dataset.public_fraction="
            f"{cfg['dataset'].get('public_fraction')} gives {len(pairs)}: raise it (e.g. 0.5)"
        )
    stage = cfg["server_stage"]["pretrain"]
    log(
        f"stage 1: training vision tower + projector on {len(pairs)} public images "
        f"({stage['objective']}, {stage['steps']} steps; once, then cached in {out})"
    )
    t0 = time.time()
    model, processor, family = load_model(cfg["model"])
    summary = pretrain(model, processor, family, pairs, stage, cfg["seed"])
    summary["seconds"] = round(time.time() - t0, 1)
    from safetensors.torch import save_file

    prefixes = tuple(p + "." for g in ("vision_encoder", "projector") for p in family.module_groups[g])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))

    write_atomically(out, fill)
    log(f"stage 1: done in {summary['seconds']:.0f} s; {format_summary(summary)}")
    return _result(summary, out, cached=False)


def format_summary(summary: dict[str, Any]) -> str:
    words = ", ".join(f"slot {i} {a:.2f}" for i, a in enumerate(summary.get("val_slot_accuracy", [])))
    return f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}" + (
        f"; held-out nearest-word accuracy {words}" if words else ""
    )


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

    ops = [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]
    x = [im.transpose(ops[turns - 1]) if turns else im for im in x]
    return [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in x] if flip else x


def stage1_lr(step: int, steps: int, warmup: int) -> float:
    """Stage 1's learning-rate factor: linear warm-up over `warmup` steps times a cosine decay."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def pretrain(model, processor, family, pairs, stage: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train the vision tower + projector of `model` in place; returns a summary with the loss
    curve and held-out (10% of the public images) nearest-word accuracy per caption slot."""
    import torch

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
    warmup = int(stage.get("warmup", max(1, steps // 20)))
    augment = bool(stage.get("augment", True))

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

    def micro_loss(step: int):
        idx = [rng.randrange(len(train)) for _ in range(bs)]
        return step_loss(idx, rng if augment else None)

    bar = StepBar("stage 1", steps, every=20)
    model.train()
    try:
        losses = optimize(
            opt,
            params,
            steps,
            micro_loss,
            lr_at=lambda s: stage1_lr(s, steps, warmup),
            max_grad_norm=1.0,
            on_step=bar,
            what="stage 1 step",
        )
    finally:
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
            losses = [
                answer_loss(model, collator.train_batch([sample(v) for v in val[i : i + 16]])).item()
                for i in range(0, len(val), 16)
            ]
        return {"val_caption_loss": float(np.mean(losses))}

    return step_loss, evaluate
