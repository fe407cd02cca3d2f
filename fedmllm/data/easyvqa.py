"""easy-vqa (PyPI package, 64x64 shape images): yes/no questions, a caption-match task, and a
flag task whose label each modality determines in part."""

from __future__ import annotations

import random
from collections import defaultdict
from functools import lru_cache

from fedmllm.common import MissingAssetError
from fedmllm.data.schema import Sample, Task

YESNO = Task("easyvqa", labels=("no", "yes"), instruction="Answer yes or no.")
CAPTION = Task(
    "easyvqa_caption", labels=("no", "yes"), instruction="Does the caption describe the image? Answer yes or no."
)
FLAG = Task("easyvqa_flag", labels=("no", "yes"), instruction="Is the post flagged under its rule? Answer yes or no.")
# The text's rule: never (no), always (yes), or "if round" (yes exactly when the image shows a circle).
RULES = (
    "The rule says: never flag it.",
    "The rule says: always flag it.",
    "The rule says: flag it if the shape is round.",
)
# Bayes accuracy of each modality alone on the flag task, from its construction (flag_samples):
# the image says round or not (half the images each, independent of the rule); the text names
# the rule (a third each). Text alone: never/always are certain, "if round" a coin -> 2/3 + 1/6.
# Image alone: a round image is flagged under always and if-round (2/3), a non-round one under
# always only (1/3) -> 2/3 either way. Both: 1. Neither: 1/2 (the labels are balanced).
FLAG_BAYES = {"both": 1.0, "text": 5 / 6, "image": 2 / 3, "none": 1 / 2}
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "black", "gray", "brown")
INSTALL = "pip install easy-vqa"


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
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


def caption_words(split: str = "train") -> dict[str, tuple[str, ...]]:
    """{image path: (colour, shape)} of every image of a split: its caption words."""
    paths = _image_paths(split)
    return {paths[i]: (color, shape) for i, (shape, color) in image_attributes(split).items()}


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
            out.append(
                Sample(id=f"{split}-cap-{i}-{k}", image=paths[i], text=f"The caption says: a {c} {s}.", label=label)
            )
    return out


def flag_samples(split: str, seed: int = 42) -> list[Sample]:
    """Flag task: "Is the post flagged under its rule?" with an easy-vqa image and a rule as text.

    Every circle image and as many other images (drawn with `seed`) are used once; within the
    round and the non-round images alike, a third get each rule (RULES, assigned in a seeded
    order), so round and rule are independent and yes/no exactly balanced (up to thirds). The
    label needs both modalities for full accuracy, and each alone carries a known part of it
    (FLAG_BAYES): like Hateful Memes and CrisisMMD, unlike the caption task, a sample that lost
    one modality is still partly answerable."""
    paths = _image_paths(split)
    rng = random.Random(seed)
    attrs = image_attributes(split)
    round_ = [i for i, (shape, _) in attrs.items() if shape == "circle"]
    other = [i for i, (shape, _) in attrs.items() if shape != "circle"]
    n = min(len(round_), len(other))
    rows: list[tuple[int, int, int]] = []  # (image, rule, label)
    for group, is_round in ((sorted(rng.sample(round_, n)), 1), (sorted(rng.sample(other, n)), 0)):
        order = list(group)
        rng.shuffle(order)
        rows += [(i, k % 3, (0, 1, is_round)[k % 3]) for k, i in enumerate(order)]
    rows.sort()
    return [Sample(id=f"{split}-flag-{i}", image=paths[i], text=RULES[rule], label=label) for i, rule, label in rows]
