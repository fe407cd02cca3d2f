"""LLaVA family: CLIP-style vision tower + MLP projector + causal LM (transformers' Llava classes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmllm.models.families.common import (
    ATTENTION,
    TOWER_PROJECTOR_LM,
    chat_prompt,
    encode,
    save_tiny,
    text_sizes,
    tiny_tokenizer,
)
from fedmllm.models.registry import Family, register_family

# ChatML that reads typed parts (and plain strings); an image part renders as "<image>\n" before
# the text, which is what the skeleton's string prompts were, so smol-llava's tuned prompts hold.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _model_cls():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def _processor_cls():
    from transformers import LlavaProcessor

    return LlavaProcessor


def image_seq_len(config, processor, height: int, width: int) -> int:
    """(image_size / patch_size)^2 patch features; the CLS feature is dropped by `default`."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def vision_config(v: dict[str, Any]):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["hidden_size"] * 4,
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        projection_dim=v["hidden_size"],
    )


def processor(tokenizer, v: dict[str, Any]):
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil  # PIL path: no torchvision

    size = v["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=v["patch_size"],
        vision_feature_select_strategy="default",  # drop CLS: (size/patch)^2 image tokens
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHATML,
    )


def assemble(text_config, tokenizer, preset: dict[str, Any], out: Path, lm_state=None) -> None:
    """Save a Llava checkpoint: a CLIP tower from `preset['vision']` + the given language model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=vision_config(preset["vision"]),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )

    def load_lm(model) -> None:  # the real language model's weights (smol-llava)
        missing, unexpected = model.model.language_model.load_state_dict(lm_state["model"], strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise RuntimeError(f"language model weights do not fit: missing={missing} unexpected={unexpected}")
        model.lm_head.weight.data.copy_(lm_state["lm_head"])

    proc = processor(tokenizer, preset["vision"])
    save_tiny(LlavaForConditionalGeneration, config, proc, preset, out, init=load_lm if lm_state else None)


def build_tiny(preset: dict[str, Any], out: Path) -> None:
    """Random CLIP tower + Llama decoder, ~100K parameters."""
    from transformers import LlamaConfig

    tokenizer = tiny_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        CHATML,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out)
    assemble(LlamaConfig(**text_sizes(preset, tokenizer)), tokenizer, preset, out)


LLAVA = register_family(
    Family(
        name="llava",
        model_cls=_model_cls,
        processor_cls=_processor_cls,
        module_groups=TOWER_PROJECTOR_LM,
        lora_targets=ATTENTION,
        model_types=("llava",),
        prompt=chat_prompt,
        encode=encode,
        image_seq_len=image_seq_len,
        build_tiny=build_tiny,
    )
)
