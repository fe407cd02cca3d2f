"""Prompt templates: raw sample fields -> the user turn; the family's chat template wraps it.

Two templates (`Task.template`, set by `dataset.template`):
- `mc`: FedMLLM's multiple-choice prompt, word for word (their data_gen scripts):
  `<image>\\nSelect the best answer to the following multiple-choice question based on the text
  and image.\\n{text}\\n{question}\\nOptions:\\n(A) ...\\nAnswer with the option's letter from the
  given choices directly and only give the best option. The best answer is: `, answered
  '(A) not-hateful'. The modality phrase names what the sample shows (" based on the text and
  image" / " based on the text" / " based on the image" / nothing) in the preamble and in the
  question; `prompt=aug` replaces it with ", without considering the modality" in both.
- `short`: `<image>\\n{text}\\n{instruction}`, answered with the bare label (the easy-vqa demo:
  single-token yes/no answers score in one forward pass). Samples with both modalities keep the
  tuned instruction as it is; a text-only or image-only sample gets the modality phrase before
  the instruction's final period, and `aug` puts ", without considering the modality" there.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmllm.config import need
from fedmllm.data.schema import Sample, Task, modality

PROMPTS = ("plain", "aug")


@dataclass
class PromptSettings:
    """`prompt`: FedMLLM's plain prompt or its modality-agnostic one (aug)."""

    name: str = "plain"

    def __post_init__(self) -> None:
        need(self.name in PROMPTS, f"prompt={self.name!r}: choose plain or aug")


PREAMBLE = "Select the best answer to the following multiple-choice question{based_on}."
ANSWER_CUE = "Answer with the option's letter from the given choices directly and only give the best option. The best answer is: "
AUG = ", without considering the modality"


def based_on(shown: str, both: str = "text and image", aug: bool = False) -> str:
    """The modality phrase for a sample showing `shown` (both, text, image or none)."""
    if aug:
        return AUG
    return {"both": f" based on the {both}", "text": " based on the text", "image": " based on the image"}.get(
        shown, ""
    )


def user_prompt(task: Task, sample: Sample, image_token: str, drop_image: bool = False) -> str:
    """The user turn for `sample` as the model sees it (without its image when `drop_image`)."""
    has_image = sample["image"] is not None and not drop_image
    shown = modality({**sample, "image": sample["image"] if has_image else None})
    parts = [image_token] if has_image and image_token else []  # "": the chat template places it
    if task.template == "mc":
        parts.append(PREAMBLE.format(based_on=based_on(shown, aug=task.aug)))
        if sample["text"]:
            parts.append(sample["text"])
        if task.question:
            parts.append(task.question.format(based_on=based_on(shown, task.both, task.aug)))
        parts.append("Options:")
        parts.extend(task.answers)
        parts.append(ANSWER_CUE)
        return "\n".join(parts)
    if sample["text"]:
        parts.append(sample["text"])
    if task.instruction:
        parts.append(_short_instruction(task.instruction, shown, task.aug))
    return "\n".join(parts)


def _short_instruction(instruction: str, shown: str, aug: bool) -> str:
    """'Answer yes or no.' as tuned for both modalities; the phrase goes before its final period."""
    phrase = AUG if aug else (based_on(shown) if shown in ("text", "image") else "")
    if not phrase:
        return instruction
    stem = instruction[:-1] if instruction.endswith((".", "?")) else instruction
    return stem + phrase + (instruction[-1] if instruction.endswith((".", "?")) else ".")


# A short system turn: SmolLM2's template otherwise inserts its 20-token default system prompt,
# a third of every sequence, and CPU time scales with tokens.
SYSTEM = "Answer questions about images."
