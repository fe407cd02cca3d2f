"""Idefics3 family (SmolVLM): SigLIP-style tower + pixel-shuffle connector + Llama decoder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedmllm.models.families.common import ATTENTION, chat_prompt, encode, save_tiny, text_sizes, tiny_tokenizer
from fedmllm.models.registry import Family, register_family

# SmolVLM-Instruct's chat template (hub chat_template.json).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MAX_SIDE = 4096  # the image processor's cap on either side after resizing
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
]


def _model_cls():
    from transformers import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration


def _processor_cls():
    # Idefics3Processor has no video half; its image processor resolves to the PIL backend
    # (Idefics3ImageProcessorPil) when torchvision is absent.
    from transformers import Idefics3Processor

    return Idefics3Processor


def image_seq_len(config, processor, height: int, width: int) -> int:
    """One global image (no splitting) or one per tile plus the global one, each
    (image_size / patch_size)^2 patches pixel-shuffled by scale_factor^2. With splitting the image
    is first resized so its longest edge is `size.longest_edge` (SmolVLM: 1536 px, small photos
    scaled up; the other edge even, both at most 4096), then cut into tiles of
    `max_image_size.longest_edge` (384 px): a 640x480 photo becomes 4 x 3 tiles."""
    v = config.vision_config
    per_image = (v.image_size // v.patch_size) ** 2 // config.scale_factor**2
    ip = processor.image_processor
    if not ip.do_image_splitting:
        return per_image
    tile, longest, aspect = ip.max_image_size["longest_edge"], ip.size["longest_edge"], width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        width, height = int(longest * aspect), longest
        width += width % 2
    if max(width, height) > MAX_SIDE:
        width, height = (MAX_SIDE, int(MAX_SIDE / aspect)) if width >= height else (int(MAX_SIDE * aspect), MAX_SIDE)
    tiles = math.ceil(height / tile) * math.ceil(width / tile)
    return per_image * (tiles + 1 if tiles > 1 else 1)


def set_resolution(processor, config, settings: dict[str, Any]) -> None:
    """`model.image_splitting`: tiles of `model.tile_size` px (longest edge) plus the global
    image, or the global image alone (one image's tokens); SmolVLM splits by default."""
    ip = processor.image_processor
    if settings.get("image_splitting") is not None:
        ip.do_image_splitting = bool(settings["image_splitting"])
    if settings.get("tile_size"):
        ip.max_image_size = {"longest_edge": int(settings["tile_size"])}


def build_tiny(preset: dict[str, Any], out: Path) -> None:
    """Random 1-layer SigLIP tower + pixel-shuffle connector + 2-layer Llama decoder."""
    from transformers import Idefics3Config
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    v = preset["vision"]
    tokenizer = tiny_tokenizer(
        SPECIAL,
        CHAT_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    scale = 2
    seq_len = (v["image_size"] // v["patch_size"]) ** 2 // scale**2
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,  # one global image: seq_len tokens (SmolVLM splits into 512 px tiles)
        size={"longest_edge": v["image_size"]},
        max_image_size={"longest_edge": v["image_size"]},
    )
    processor = _processor_cls()(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=v["hidden_size"],
            intermediate_size=v["hidden_size"] * 2,
            num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
        ),
        text_config=dict(text_sizes(preset, tokenizer), model_type="llama"),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )
    save_tiny(_model_cls(), config, processor, preset, out)


IDEFICS3 = register_family(
    Family(
        name="idefics3",
        model_cls=_model_cls,
        processor_cls=_processor_cls,
        # transformers 5 layout: Idefics3ForConditionalGeneration.model.{vision_model, connector,
        # text_model} + lm_head
        module_groups={
            "vision_encoder": ("model.vision_model",),
            "projector": ("model.connector",),
            "llm": ("model.text_model", "lm_head"),
        },
        lora_targets=ATTENTION,
        model_types=("idefics3",),
        prompt=chat_prompt,
        encode=encode,
        image_seq_len=image_seq_len,
        build_tiny=build_tiny,
        resolution=set_resolution,
        resolution_keys=("image_splitting", "tile_size"),
    )
)
