"""The server stages' data: the public pool's images with their caption words (stage 1) and its
task samples with each image replaced by its caption as text (adapter pre-training). Only easy-vqa
has captions (its colour and shape, read off its own open questions)."""

from __future__ import annotations

from typing import Any

from fedmllm.config import typed
from fedmllm.data import DatasetSettings, easyvqa, load_public
from fedmllm.data.schema import Sample


def load_public_captions(
    dataset: DatasetSettings | dict[str, Any], seed: int = 42
) -> list[tuple[str, tuple[str, ...]]]:
    """The public pool's images with their caption words, for the server's stage-1 alignment:
    `(image path, (word, ...))`, the same images as `load_public`, sorted by path.

    easy-vqa captions are `(colour, shape)`, read off the dataset's own open questions.
    """
    images = {s["image"] for s in load_public(dataset, seed)}
    return sorted((p, words) for p, words in _caption_words(dataset).items() if p in images)


def load_public_captioned(dataset: DatasetSettings | dict[str, Any], seed: int = 42) -> list[Sample]:
    """The public pool's task samples with the image replaced by its caption as text, for the
    server's adapter pre-training (`server_stage.pretrain.lora`): "The image shows a red circle.
    <question>", no image. Samples whose image has no caption are left out."""
    words = _caption_words(dataset)
    return [
        Sample(
            id=s["id"] + "-captioned",
            image=None,
            text=f"The image shows a {' '.join(words[s['image']])}. {s['text']}",
            label=s["label"],
        )
        for s in load_public(dataset, seed)
        if s["image"] in words
    ]


def _caption_words(dataset: DatasetSettings | dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Caption words of every training image that has them: {image path: (colour, shape)}."""
    settings = typed(DatasetSettings, dataset, "dataset")
    name = settings.name
    if not settings.captioned:
        raise ValueError(
            f"dataset.name={name!r} has no image captions for server_stage.pretrain; "
            "use server_stage=none or an easy-vqa dataset"
        )
    return easyvqa.caption_words("train")
