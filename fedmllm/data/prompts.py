"""Prompt templates: raw sample fields -> the user turn; the family's chat template wraps it."""

from __future__ import annotations

from fedmllm.data.schema import Sample, Task


def user_prompt(task: Task, sample: Sample, image_token: str, drop_image: bool = False) -> str:
    """The user turn: image placeholder (if the sample has an image), text, instruction."""
    parts = []
    if sample["image"] is not None and not drop_image:
        parts.append(image_token)
    if sample["text"]:
        parts.append(sample["text"])
    parts.append(task.instruction)
    return "\n".join(parts)


# A short system turn: SmolLM2's template otherwise inserts its 20-token default system prompt,
# a third of every sequence, and CPU time scales with tokens.
SYSTEM = "Answer questions about images."


def chat_prompt(tokenizer, user: str) -> str:
    """Apply the model's chat template, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        tokenize=False,
        add_generation_prompt=True,
    )
