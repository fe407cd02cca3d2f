"""PaliGemma family: SigLIP tower + linear projector + Gemma decoder, prefix-LM prompting.

PaliGemma has no chat template: the input is `<image>` x N, then BOS, the prompt (prefix) and
"\\n"; the answer (suffix) follows and ends with EOS. The prefix attends bidirectionally
(token_type_ids 0), the suffix causally (token_type_ids 1), as in the paper and HF's processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmllm.models.families.common import ATTENTION, TOWER_PROJECTOR_LM, save_tiny, text_sizes, tiny_tokenizer
from fedmllm.models.registry import Family, register_family

IMAGE = "<image>"


def _model_cls():
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration


def _processor_cls():
    from transformers import PaliGemmaProcessor

    return PaliGemmaProcessor


def prompt(processor, system: str, user: str, has_image: bool) -> str:
    """`<image>` + BOS + prompt + newline (the system turn has no place in PaliGemma's format)."""
    return (IMAGE if has_image else "") + processor.tokenizer.bos_token + user + "\n"


def encode(processor, prompts: list[str], images: list, answers: list[str] | None = None) -> dict[str, Any]:
    """Expand each `<image>` to image_seq_length tokens, tokenize, mark the answer as suffix.

    HF's processor would add BOS and "\\n" itself, but misplaces BOS in a batch that mixes
    prompts with and without an image, so the prompt is built here and only tokenized.
    """
    import torch

    tok = processor.tokenizer
    texts = [p.replace(IMAGE, IMAGE * processor.image_seq_length) for p in prompts]
    if answers is not None:
        texts = [t + a for t, a in zip(texts, answers)]
    batch = dict(tok(texts, padding=True, return_tensors="pt", add_special_tokens=False))
    types = torch.zeros_like(batch["input_ids"])
    if answers is not None:
        for row, answer in enumerate(answers):
            types[row, -len(tok(answer, add_special_tokens=False)["input_ids"]) :] = 1
    batch["token_type_ids"] = types
    if images:
        batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch


def image_seq_len(config, processor, height: int, width: int) -> int:
    """(image_size / patch_size)^2 SigLIP patches, every image resized to image_size^2."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def build_tiny(preset: dict[str, Any], out: Path) -> None:
    """Random 1-layer SigLIP tower + linear projector + 2-layer Gemma decoder."""
    from transformers import PaliGemmaConfig
    from transformers.models.siglip import SiglipImageProcessorPil

    v = preset["vision"]
    tokenizer = tiny_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", IMAGE],
        None,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": v["image_size"], "width": v["image_size"]},
        image_seq_length=(v["image_size"] // v["patch_size"]) ** 2,
    )
    # The processor adds PaliGemma's 1024 <locNNNN> + 128 <segNNN> tokens: size the vocab after it.
    processor = _processor_cls()(image_processor=image_processor, tokenizer=tokenizer)
    text = text_sizes(preset, tokenizer)
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=v["hidden_size"],
            intermediate_size=v["hidden_size"] * 2,
            num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            projection_dim=text["hidden_size"],
            vision_use_head=False,
        ),
        text_config=dict(text, model_type="gemma", head_dim=text["hidden_size"] // text["num_attention_heads"]),
        projection_dim=text["hidden_size"],
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=True,
    )
    save_tiny(_model_cls(), config, processor, preset, out)


PALIGEMMA = register_family(
    Family(
        name="paligemma",
        model_cls=_model_cls,
        processor_cls=_processor_cls,
        module_groups=TOWER_PROJECTOR_LM,
        lora_targets=ATTENTION,
        model_types=("paligemma",),
        prompt=prompt,
        encode=encode,
        image_seq_len=image_seq_len,
        build_tiny=build_tiny,
    )
)
