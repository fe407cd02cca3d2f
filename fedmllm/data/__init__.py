"""Data sources, sample schema, prompt templates and collation."""

from __future__ import annotations

import random
from typing import Any

from fedmllm.data.schema import Sample, Task


def load_task(dataset_cfg: dict[str, Any], seed: int = 42) -> tuple[Task, list[Sample], list[Sample]]:
    """Return (task, train pool, held-out eval samples) for a dataset config.

    The held-out set is `dataset.eval_samples` samples drawn with `seed` from the source's
    test split; it never overlaps the training pool that clients partition.
    """
    from fedmllm.data import easyvqa

    name = dataset_cfg["name"]
    if name == "easyvqa":
        balanced = bool(dataset_cfg.get("balanced", False))
        task = easyvqa.YESNO
        train = easyvqa.yesno_samples("train", balanced=balanced, seed=seed)
        test = easyvqa.yesno_samples("test", balanced=balanced, seed=seed)
    elif name == "easyvqa_caption":
        task = easyvqa.CAPTION
        train, test = easyvqa.caption_samples("train", seed=seed), easyvqa.caption_samples("test", seed=seed)
    else:
        raise ValueError(f"dataset.name={name!r} is unknown; choose easyvqa or easyvqa_caption")
    public_images = _public_images(train, float(dataset_cfg.get("public_fraction", 0.0)), seed)
    if public_images:
        train = [s for s in train if s["image"] not in public_images]
    n = int(dataset_cfg.get("eval_samples", 200))
    if 0 < n < len(test):
        test = random.Random(seed).sample(test, n)
    return task, train, test


def load_public(dataset_cfg: dict[str, Any], seed: int = 42) -> list[Sample]:
    """The server's public pool: every training-split sample whose image is among the
    `dataset.public_fraction` of images drawn with `seed`. Clients never see these images
    (load_task drops them from the pool they partition)."""
    frac = float(dataset_cfg.get("public_fraction", 0.0))
    if frac <= 0:
        return []
    full = load_task({**dataset_cfg, "public_fraction": 0.0, "eval_samples": 0}, seed)[1]
    public_images = _public_images(full, frac, seed)
    return [s for s in full if s["image"] in public_images]


def load_public_captions(dataset_cfg: dict[str, Any], seed: int = 42) -> list[tuple[str, tuple[str, ...]]]:
    """The public pool's images with their caption words, for the server's stage-1 alignment:
    `(image path, (word, ...))`, the same images as `load_public`, sorted by path.

    easy-vqa captions are `(colour, shape)`, read off the dataset's own open questions.
    """
    from fedmllm.data import easyvqa

    name = dataset_cfg["name"]
    if name not in ("easyvqa", "easyvqa_caption"):
        raise ValueError(
            f"dataset.name={name!r} has no image captions for server_stage.pretrain; "
            "use server_stage=none or an easy-vqa dataset"
        )
    images = {s["image"] for s in load_public(dataset_cfg, seed)}
    paths = easyvqa._image_paths("train")
    out = [(paths[i], (color, shape)) for i, (shape, color) in easyvqa.image_attributes("train").items()]
    return sorted((p, words) for p, words in out if p in images)


def _public_images(samples: list[Sample], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of the distinct images (split by image, so no image is on both sides)."""
    if fraction <= 0:
        return set()
    images = sorted({s["image"] for s in samples if s["image"] is not None})
    k = round(fraction * len(images))
    return set(random.Random(seed).sample(images, k)) if k else set()
