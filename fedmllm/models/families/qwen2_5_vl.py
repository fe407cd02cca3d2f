"""Qwen2.5-VL family: windowed-attention ViT (SwiGLU, RMSNorm) with a 2x2 merger + Qwen2 decoder.

Same processor, prompt format and module layout as Qwen2-VL; a different vision tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmllm.models.families import qwen2_vl
from fedmllm.models.families.common import ATTENTION, chat_prompt, encode, image_only, save_tiny, text_sizes
from fedmllm.models.registry import Family, register_family


def _model_cls():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def _processor_cls():
    from transformers import Qwen2_5_VLProcessor

    return image_only(Qwen2_5_VLProcessor)


def build_tiny(preset: dict[str, Any], out: Path) -> None:
    """Random 2-block windowed ViT (block 1 full attention) + 2-layer Qwen2 decoder."""
    from transformers import Qwen2_5_VLConfig

    tokenizer, processor = qwen2_vl.tiny_tokenizer_and_processor(preset, _processor_cls())
    v, text = preset["vision"], text_sizes(preset, tokenizer)
    layers = max(2, v["layers"])  # one windowed block and one full-attention block
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=layers,
            hidden_size=v["hidden_size"],
            intermediate_size=v["hidden_size"] * 2,
            num_heads=v["heads"],
            out_hidden_size=text["hidden_size"],
            patch_size=v["patch_size"],
            spatial_merge_size=2,
            temporal_patch_size=2,
            # windows of window_size px = 2x2 merged tokens at patch 8
            window_size=v["patch_size"] * 2 * 2,
            fullatt_block_indexes=[layers - 1],
        ),
        text_config=dict(text, rope_parameters=qwen2_vl.mrope(preset)),
        tie_word_embeddings=True,
        **qwen2_vl.token_ids(tokenizer),
    )
    save_tiny(_model_cls(), config, processor, preset, out)


QWEN2_5_VL = register_family(
    Family(
        name="qwen2_5_vl",
        model_cls=_model_cls,
        processor_cls=_processor_cls,
        module_groups=qwen2_vl.MODULE_GROUPS,  # same layout: model.visual.{..., merger}
        lora_targets=ATTENTION,
        model_types=("qwen2_5_vl",),
        prompt=chat_prompt,
        encode=encode,
        image_seq_len=qwen2_vl.image_seq_len,
        build_tiny=build_tiny,
        resolution=qwen2_vl.set_resolution,
        resolution_keys=("min_pixels", "max_pixels"),
        image_token="<|image_pad|>",
        vision_lora_targets=("qkv", "proj"),  # the ViT's fused attention input and its output
    )
)
