"""Qwen2-VL family: ViT with 2x2 patch merger + Qwen2 decoder with multimodal RoPE."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmllm.models.families.common import (
    ATTENTION,
    chat_prompt,
    encode,
    image_only,
    save_tiny,
    text_sizes,
    tiny_tokenizer,
)
from fedmllm.models.registry import Family, register_family

# Qwen2-VL-Instruct's chat template (hub tokenizer_config.json), video branch left out.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Module groups, transformers 5: Qwen2VLForConditionalGeneration.model.visual.{patch_embed,
# rotary_pos_emb, blocks, merger} + .model.language_model + lm_head. The merger (the 2x2
# patch merger MLP) is the projector; it sits inside `visual`, so the tower is listed by part.
MODULE_GROUPS = {
    "vision_encoder": ("model.visual.patch_embed", "model.visual.rotary_pos_emb", "model.visual.blocks"),
    "projector": ("model.visual.merger",),
    "llm": ("model.language_model", "lm_head"),
}


def _model_cls():
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


def _processor_cls():
    from transformers import Qwen2VLProcessor

    return image_only(Qwen2VLProcessor)


def image_seq_len(config, processor, height: int, width: int) -> int:
    """The image is resized to multiples of patch*merge within [min, max] pixels; each merge x
    merge block of patch_size patches becomes one token."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    v = config.vision_config
    size = processor.image_processor.size
    h, w = smart_resize(height, width, v.patch_size * v.spatial_merge_size, size["shortest_edge"], size["longest_edge"])
    return (h // v.patch_size) * (w // v.patch_size) // v.spatial_merge_size**2


def set_resolution(processor, config, settings: dict[str, Any]) -> None:
    """`model.min_pixels` / `model.max_pixels`: the pixel range every image is resized into (in
    multiples of patch x merge = 28 px); each 28 x 28 block is one token, so max_pixels / 784 is
    the most tokens an image costs (the checkpoint's default, 12.8 M pixels, admits 16,384)."""
    ip = processor.image_processor
    size = {}
    if settings.get("min_pixels"):
        size["shortest_edge"] = int(settings["min_pixels"])
    if settings.get("max_pixels"):
        size["longest_edge"] = int(settings["max_pixels"])
    ip.size = replace(ip.size, **size)


def tiny_tokenizer_and_processor(preset: dict[str, Any], processor_cls):
    """Tiny Qwen-style tokenizer + the image-only processor, images resized to image_size^2."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    v = preset["vision"]
    tokenizer = tiny_tokenizer(
        SPECIAL, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    pixels = v["image_size"] ** 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=v["patch_size"],
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    return tokenizer, processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def mrope(preset: dict[str, Any]) -> dict[str, Any]:
    """Multimodal RoPE: the head's rotary half split over (time, height, width), Qwen's 1:1.5:1.5."""
    half = preset["text"]["hidden_size"] // preset["text"]["heads"] // 2
    t = half // 4
    h = (half - t) // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, h, half - t - h]}


def token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_tiny(preset: dict[str, Any], out: Path) -> None:
    """Random 1-block ViT (2x2 merger) + 2-layer Qwen2 decoder, a few hundred K parameters."""
    from transformers import Qwen2VLConfig

    tokenizer, processor = tiny_tokenizer_and_processor(preset, _processor_cls())
    v, text = preset["vision"], text_sizes(preset, tokenizer)
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=v["layers"],
            embed_dim=v["hidden_size"],
            hidden_size=text["hidden_size"],
            num_heads=v["heads"],
            patch_size=v["patch_size"],
            spatial_merge_size=2,
            temporal_patch_size=2,
            mlp_ratio=2,
        ),
        text_config=dict(text, rope_parameters=mrope(preset)),
        tie_word_embeddings=True,
        **token_ids(tokenizer),
    )
    save_tiny(_model_cls(), config, processor, preset, out)


QWEN2_VL = register_family(
    Family(
        name="qwen2_vl",
        model_cls=_model_cls,
        processor_cls=_processor_cls,
        module_groups=MODULE_GROUPS,
        lora_targets=ATTENTION,
        model_types=("qwen2_vl",),
        prompt=chat_prompt,
        encode=encode,
        image_seq_len=image_seq_len,
        build_tiny=build_tiny,
        resolution=set_resolution,
        resolution_keys=("min_pixels", "max_pixels"),
        image_token="<|image_pad|>",
        vision_lora_targets=("qkv", "proj"),  # the ViT's fused attention input and its output
    )
)
