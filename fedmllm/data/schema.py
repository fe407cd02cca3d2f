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


TEMPLATES = ("short", "mc")


@dataclass(frozen=True)
class Task:
    """A classification task: its label names (answer options) and how to phrase the prompt.

    `template` picks the prompt (fedmllm.data.prompts): `short` is sample text + `instruction`,
    answered with the bare label; `mc` is FedMLLM's multiple-choice prompt around `question`,
    answered with '(A) <label>'. `aug` is FedMLLM's modality-agnostic wording.
    """

    name: str
    labels: tuple[str, ...]
    instruction: str = ""  # short template: follows the sample text, e.g. "Answer yes or no."
    question: str = ""  # mc template: the question line; "{based_on}" marks the modality phrase
    template: str = "short"
    both: str = "text and image"  # how `question` names both modalities (FedMLLM's CrisisMMD: "image and text")
    aug: bool = False  # ", without considering the modality" replaces the modality phrase
    # open-ended answers: `labels` is the answer vocabulary; evaluated by generation, exact match and
    # VQA-normalized accuracy, not by scoring options (dataset.answers=open)
    open: bool = False

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"Task {self.name!r}: template={self.template!r}; choose one of {TEMPLATES}")
        if self.open and self.template != "short":
            raise ValueError(f"Task {self.name!r}: open-ended answers need the short template (answered in words)")
        if self.template == "mc" and len(self.labels) > 26:
            raise ValueError(f"Task {self.name!r}: {len(self.labels)} labels exceed the mc template's letters A-Z")

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer the model writes for each label: '(A) not-hateful' (mc) or the label (short)."""
        if self.template == "mc":
            return tuple(f"({chr(ord('A') + i)}) {label}" for i, label in enumerate(self.labels))
        return self.labels


def modality(sample: Sample) -> str:
    """Which modalities a sample has: both, image, text or none."""
    has_image, has_text = sample["image"] is not None, bool(sample["text"])
    return {(True, True): "both", (True, False): "image", (False, True): "text"}.get((has_image, has_text), "none")
