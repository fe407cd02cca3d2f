"""LLaVA-OneVision family: SigLIP tower + MLP projector + Qwen2 decoder, AnyRes image tiling."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedmllm.models.families.common import (
    ATTENTION,
    TOWER_PROJECTOR_LM,
    chat_prompt,
    encode,
    image_only,
    save_tiny,
    text_sizes,
    tiny_tokenizer,
)
from fedmllm.models.registry import Family, register_family

# llava-hf/llava-onevision-qwen2-*-ov-hf chat template (images first, then text), video and
# generation markers left out.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def _model_cls():
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration


def _processor_cls():
    from transformers import LlavaOnevisionProcessor

    return image_only(LlavaOnevisionProcessor)


def image_seq_len(config, processor, height: int, width: int) -> int:
    """AnyRes: the base image ((size/patch)^2 features) + the image tiled at the best pinpoint
    resolution, unpadded back to the original aspect ratio, one newline token per feature row;
    a grid over `anyres_max_N` x base features is downscaled (the 0.5b-ov checkpoint: N = 9)."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    best_h, best_w = min(config.image_grid_pinpoints, key=lambda r: _fit(r, height, width))
    rows, cols = best_h // v.image_size * side, best_w // v.image_size * side
    if width / height > cols / rows:  # wider than the grid: padding rows are dropped
        rows -= (rows - int(round(height * cols / width, 7))) // 2 * 2
    else:
        cols -= (cols - int(round(width * rows / height, 7))) // 2 * 2
    ratio = math.sqrt(rows * cols / (int(config.vision_aspect_ratio.removeprefix("anyres_max_")) * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side**2 + rows * cols + rows


def _fit(resolution, height: int, width: int):
    """select_best_resolution's order: most effective pixels, then least waste."""
    h, w = resolution
    s = min(w / width, h / height)
    effective = min(int(width * s) * int(height * s), width * height)
    return (-effective, w * h - effective)


def set_resolution(processor, config, settings: dict[str, Any]) -> None:
    """`model.max_grid=N`: AnyRes tiles an image at the pinpoint resolution that fits it best;
    only pinpoints of at most N x N base tiles stay (the 0.5b-ov checkpoint lists 36, up to 6 x 6
    tiles of 384 px: a 1600x1200 photo costs 7,309 tokens, 2,929 at 640x480). The processor and
    the model read the same list (it decides the feature grid), so both are cut."""
    n, base = int(settings["max_grid"]), processor.image_processor.size["height"]
    pins = [p for p in config.image_grid_pinpoints if p[0] <= n * base and p[1] <= n * base]
    processor.image_processor.image_grid_pinpoints = pins
    config.image_grid_pinpoints = pins


def build_tiny(preset: dict[str, Any], out: Path) -> None:
    """Random 1-layer SigLIP tower + MLP projector + 2-layer Qwen2 decoder; one AnyRes pinpoint."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    v = preset["vision"]
    size = v["image_size"]
    tokenizer = tiny_tokenizer(
        SPECIAL, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    pinpoints = [[size, size]]  # the hub checkpoints list 36 (384..2304 px); one keeps images small
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
    )
    processor = _processor_cls()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(size // v["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=v["hidden_size"],
            intermediate_size=v["hidden_size"] * 2,
            num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"],
            image_size=size,
            patch_size=v["patch_size"],
            vision_use_head=False,
        ),
        text_config=dict(text_sizes(preset, tokenizer), model_type="qwen2"),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=True,
    )
    save_tiny(_model_cls(), config, processor, preset, out)


LLAVA_ONEVISION = register_family(
    Family(
        name="llava_onevision",
        model_cls=_model_cls,
        processor_cls=_processor_cls,
        module_groups=TOWER_PROJECTOR_LM,  # + model.image_newline, a frozen parameter
        lora_targets=ATTENTION,
        model_types=("llava_onevision",),
        prompt=chat_prompt,
        encode=encode,
        image_seq_len=image_seq_len,
        build_tiny=build_tiny,
        resolution=set_resolution,
        resolution_keys=("max_grid",),
    )
)
