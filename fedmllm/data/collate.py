"""Collation: samples -> model inputs through the model family (its chat template, its processor
expanding image placeholders), with the loss on answer tokens only."""

from __future__ import annotations

from typing import Any

from PIL import Image

from fedmllm.data.prompts import SYSTEM, user_prompt
from fedmllm.data.reading import DataError
from fedmllm.data.schema import Sample, Task

IGNORE = -100  # label value the loss ignores


def load_image(path: str) -> Image.Image:
    """The image as RGB; a file PIL cannot decode (a PNG cut after its header passes the loaders'
    header check) raises DataError naming it, instead of a decoder error naming nothing."""

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise struct.error, IndexError, ...
        raise DataError(
            f"image {path} cannot be decoded ({type(err).__name__}: {err}); remove its row, or set "
            "dataset.strict=true to check every image fully when the data loads"
        ) from None


class Collator:
    """Turns samples into processor outputs for one (processor, family, task)."""

    def __init__(self, processor, family, task: Task):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Left padding puts every answer at the end of its row, so the model computes logits
        # only for the last few positions (`logits_to_keep`): the 49K-vocab head over all ~45
        # positions would otherwise cost about a tenth of each step. RoPE is relative, so the
        # shifted absolute positions of padded rows change nothing.
        self.tokenizer.padding_side = "left"
        self.family = family
        self.task = task
        self.eos = self.tokenizer.eos_token or ""
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(family.image_token)
        self.trained_tokens: list[tuple[int, int]] = []  # (image, text) tokens of each trained sample

    def token_counts(self, batch: dict[str, Any]) -> list[tuple[int, int]]:
        """(image tokens, text tokens) of each row of an encoded batch (padding left out)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image = (ids == self.image_token_id).sum(1).tolist()
        return [(int(i), int(n) - int(i)) for i, n in zip(image, mask.sum(1).tolist())]

    def tokens_per_sample(self) -> tuple[float, float]:
        """Mean (image, text) tokens of the samples trained since the collator was made."""
        if not self.trained_tokens:
            return 0.0, 0.0
        n = len(self.trained_tokens)
        return sum(i for i, _ in self.trained_tokens) / n, sum(t for _, t in self.trained_tokens) / n

    def _prompts(self, samples: list[Sample], drop_image: bool) -> tuple[list[str], list[Image.Image]]:
        texts, images = [], []
        for s in samples:
            has_image = s["image"] is not None and not drop_image
            user = user_prompt(self.task, s, "", drop_image)  # the family places the image
            texts.append(self.family.prompt(self.processor, SYSTEM, user, has_image))
            if has_image:
                images.append(load_image(s["image"]))
        return texts, images

    def _encode(self, texts: list[str], images: list[Image.Image], answers: list[str] | None = None) -> dict[str, Any]:
        return self.family.encode(self.processor, texts, images, answers)

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as it follows the prompt (answer text + end of turn)."""
        return self.tokenizer(answer + self.eos, add_special_tokens=False)["input_ids"]

    def train_batch(self, samples: list[Sample], drop_image: bool = False) -> dict[str, Any]:
        """Prompt + gold answer; labels are IGNORE everywhere except the answer tokens.

        `keep` is how many final positions the loss needs (longest answer + 1).
        """
        texts, images = self._prompts(samples, drop_image)
        answers = [self.task.answers[s["label"]] for s in samples]
        batch = self._encode(texts, images, [a + self.eos for a in answers])
        labels = batch["input_ids"].clone().fill_(IGNORE)
        longest = 0
        for row, answer in enumerate(answers):
            ids = self.answer_ids(answer)
            tail = batch["input_ids"][row, -len(ids) :].tolist()
            if tail != ids:  # the tokenizer merged across the prompt/answer boundary
                raise ValueError(f"answer {answer!r} does not tokenize apart from its prompt: {tail} != {ids}")
            labels[row, -len(ids) :] = batch["input_ids"][row, -len(ids) :]
            longest = max(longest, len(ids))
        batch["labels"] = labels
        batch["keep"] = longest + 1
        self.trained_tokens += self.token_counts(batch)
        return batch

    def prompt_batch(self, samples: list[Sample], drop_image: bool = False) -> dict[str, Any]:
        """Prompts only, left-padded: the next-token logits at position -1 score single-token answers."""
        return self._encode(*self._prompts(samples, drop_image))

    def option_batch(self, samples: list[Sample], option: str, drop_image: bool = False) -> dict[str, Any]:
        """Prompt + one given answer text, e.g. '(A) not-hateful' (for scoring multi-token answers)."""
        texts, images = self._prompts(samples, drop_image)
        return self._encode(texts, images, [option] * len(texts))
