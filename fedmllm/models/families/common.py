"""Pieces the family modules share: chat-template prompts, processor encoding, the image-only
processor path, and the tiny offline checkpoints (tokenizer + save)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # the LoRA targets of every decoder here

# transformers 5 layout of Llava, LlavaOnevision and PaliGemma ...ForConditionalGeneration:
# .model.{vision_tower, multi_modal_projector, language_model} + lm_head
TOWER_PROJECTOR_LM = {
    "vision_encoder": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "llm": ("model.language_model", "lm_head"),
}


def chat_prompt(processor, system: str, user: str, has_image: bool) -> str:
    """The model's own chat template over typed parts (the Hugging Face convention every hub
    template of our families reads), ending where the assistant's answer starts."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": user}]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": content},
    ]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(processor, prompts: list[str], images: list, answers: list[str] | None = None) -> dict[str, Any]:
    """Processor outputs for prompts (+ answers appended); the processor expands each image
    placeholder to the image's tokens. Images are in prompt order, one per placeholder."""
    texts = prompts if answers is None else [p + a for p, a in zip(prompts, answers)]
    return dict(
        processor(text=texts, images=images or None, padding=True, return_tensors="pt", add_special_tokens=False)
    )


@functools.cache
def image_only(processor_cls: type) -> type:
    """`processor_cls` without its video half.

    The HF processors of qwen2-vl, qwen2.5-vl and llava-onevision take a `video_processor`,
    whose classes need torchvision, and torchvision does not import beside the CPU torch wheel.
    ProcessorMixin derives its sub-processors from `get_attributes()`, for construction,
    save_pretrained and from_pretrained alike; dropping `video_processor` there gives a
    processor that saves and reloads image processor + tokenizer only. Images and text are
    processed by the unchanged HF code; passing `videos=` raises.
    """
    from transformers.processing_utils import ProcessorMixin

    class _NoVideo(ProcessorMixin):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]

        def __init__(self, *args, **kwargs):
            # The HF __init__ passes its video_processor (None here) on, by position or name.
            n = len(self.get_attributes())
            if any(v is not None for v in (kwargs.pop("video_processor", None), *args[n:])):
                raise ValueError(f"{type(self).__name__} is image-only: it takes no video processor")
            super().__init__(*args[:n], **kwargs)

    name = processor_cls.__name__.replace("Processor", "ImageOnlyProcessor")
    return type(name, (processor_cls, _NoVideo), {"__module__": __name__})


# --- tiny offline checkpoints ---------------------------------------------------------------

CORPUS = [
    "system user assistant You are a helpful assistant. Answer questions about images.",
    "Answer the question about the image with yes or no. yes no Yes No",
    "what color is the shape? is there a red circle in the image? does the image contain a "
    "rectangle triangle circle green blue teal black gray yellow brown",
    "The caption says: a shape. Does the caption match the image? Answer:",
    "Select the best answer to the following multiple-choice question based on the text and image. "
    "Options: (A) not-hateful (B) hateful The best answer is:",
]


def tiny_tokenizer(special: list[str], chat_template: str | None, vocab_size: int = 400, **roles: str):
    """A byte-level BPE (a few hundred tokens) trained on fedmllm's prompt vocabulary.

    `special`: the family's special tokens (never split); `roles`: bos_token, eos_token,
    pad_token, unk_token, each one of `special`.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    named = set(roles.values())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=[s for s in special if s not in named], **roles
    )
    fast.chat_template = chat_template
    return fast


def text_sizes(preset: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Decoder settings shared by the tiny presets (Llama / Qwen2 / Gemma style configs)."""
    t = preset["text"]
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=t["hidden_size"],
        intermediate_size=t.get("intermediate", t["hidden_size"] * 2),
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t.get("kv_heads", t["heads"]),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_tiny(model_cls, config, processor, preset: dict[str, Any], out: Path, init=None) -> None:
    """Instantiate `model_cls(config)` with the preset's seed (then `init(model)`, e.g. real
    language-model weights) and save it with its processor and the preset that built it."""
    import torch

    torch.manual_seed(preset.get("seed", 0))
    model = model_cls(config)
    if init is not None:
        init(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (Path(out) / "fedmllm_preset.json").write_text(json.dumps(preset, indent=1, sort_keys=True))
