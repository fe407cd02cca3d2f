"""easy-vqa (PyPI package, 64x64 shape images): yes/no questions and a caption-match task."""

from __future__ import annotations

import random
from collections import defaultdict
from functools import lru_cache

from fedmllm.data.schema import Sample, Task

YESNO = Task("easyvqa", labels=("no", "yes"), instruction="Answer yes or no.")
CAPTION = Task(
    "easyvqa_caption", labels=("no", "yes"), instruction="Does the caption describe the image? Answer yes or no."
)
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "black", "gray", "brown")
INSTALL = "pip install easy-vqa"


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        from fedmllm.models.build import MissingAssetError

        raise MissingAssetError(f"the easy-vqa tasks need the PyPI package easy-vqa: {INSTALL}") from None
    return easy_vqa


@lru_cache(maxsize=4)
def _questions(split: str) -> tuple[tuple[str, str, int], ...]:
    ev = _easy_vqa()
    texts, answers, image_ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    return tuple(zip(texts, answers, image_ids))


@lru_cache(maxsize=4)
def _image_paths(split: str) -> dict[int, str]:
    ev = _easy_vqa()
    return ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()


def yesno_samples(split: str, balanced: bool = False, seed: int = 42) -> list[Sample]:
    """easy-vqa's yes/no questions of a split (`train` or `test`).

    Natural mix: the questions as the dataset has them; the question text alone predicts
    much of the answer (about 0.8 after short training against a 0.5 yes rate).
    `balanced`: per distinct question, as many yes as no answers (the surplus dropped at
    random with `seed`), so the question alone gives chance and only the image helps.
    """
    paths = _image_paths(split)
    rows = [(q, a, i) for q, a, i in _questions(split) if a in ("yes", "no")]
    if balanced:
        by_q: dict[str, dict[str, list]] = defaultdict(lambda: {"yes": [], "no": []})
        for row in rows:
            by_q[row[0]][row[1]].append(row)
        rng = random.Random(seed)
        rows = []
        for q in sorted(by_q):
            yes, no = by_q[q]["yes"], by_q[q]["no"]
            n = min(len(yes), len(no))
            rows += rng.sample(yes, n) + rng.sample(no, n)
        rows.sort(key=lambda r: (r[2], r[0]))
    return [
        Sample(id=f"{split}-{i}-{k}", image=paths[i], text=q, label=YESNO.labels.index(a))
        for k, (q, a, i) in enumerate(rows)
    ]


def image_attributes(split: str) -> dict[int, tuple[str, str]]:
    """(shape, colour) of every image, read off easy-vqa's own open-question answers."""
    shape: dict[int, str] = {}
    color: dict[int, str] = {}
    for q, a, i in _questions(split):
        if a in SHAPES:
            shape[i] = a
        elif a in COLORS and q.startswith("what color"):
            color[i] = a
    return {i: (shape[i], color[i]) for i in sorted(shape) if i in color}


def caption_samples(split: str, seed: int = 42) -> list[Sample]:
    """Caption-match task: 'a <colour> <shape>' that matches the image or contradicts it.

    Per image, one true and one false caption (false: colour, shape or both changed,
    chosen with `seed`), so yes and no are exactly balanced and only the image tells them apart.
    """
    paths = _image_paths(split)
    rng = random.Random(seed)
    out: list[Sample] = []
    for i, (shape, color) in image_attributes(split).items():
        wrong = rng.choice(("color", "shape", "both"))
        fshape = rng.choice([s for s in SHAPES if s != shape]) if wrong in ("shape", "both") else shape
        fcolor = rng.choice([c for c in COLORS if c != color]) if wrong in ("color", "both") else color
        for k, (c, s, label) in enumerate(((color, shape, 1), (fcolor, fshape, 0))):
            out.append(Sample(id=f"{split}-cap-{i}-{k}", image=paths[i], text=f"The caption says: a {c} {s}.", label=label))
    return out
