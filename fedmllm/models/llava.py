"""LLaVA family: CLIP-style vision tower + MLP projector + causal LM (transformers' Llava classes)."""

from __future__ import annotations

from fedmllm.models.registry import Family, register_family


def _model_cls():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def _processor_cls():
    from transformers import LlavaProcessor

    return LlavaProcessor


LLAVA = register_family(
    Family(
        name="llava",
        model_cls=_model_cls,
        processor_cls=_processor_cls,
        # transformers 5 layout: LlavaForConditionalGeneration.model.{vision_tower,
        # multi_modal_projector, language_model} + lm_head
        module_groups={
            "vision_encoder": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector",),
            "llm": ("model.language_model", "lm_head"),
        },
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    )
)
