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
    n = int(dataset_cfg.get("eval_samples", 200))
    if 0 < n < len(test):
        test = random.Random(seed).sample(test, n)
    return task, train, test
