"""Canonical sample schema shared by every data source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


class Sample(TypedDict):
    """One example: raw fields only; prompts are built later from the task."""

    id: str
    image: str | None  # path to an image file, None when the sample has no image
    text: str | None  # the sample's text (question, caption, meme text), None when absent
    label: int  # index into the task's label names


@dataclass(frozen=True)
class Task:
    """A classification task: its label names (answer options) and how to phrase the prompt."""

    name: str
    labels: tuple[str, ...]
    instruction: str  # appended after the sample text, e.g. "Answer yes or no."


def modality(sample: Sample) -> str:
    """Which modalities a sample has: both, image, text or none."""
    has_image, has_text = sample["image"] is not None, bool(sample["text"])
    return {(True, True): "both", (True, False): "image", (False, True): "text"}.get(
        (has_image, has_text), "none"
    )
